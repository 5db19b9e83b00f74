//! `touchctl daemon`: serves the HTTP API, keeps the registry in step with the files (with
//! `--watch`), and sends queued batches to the live touchpoints. Shutdown is done once, here: on
//! SIGTERM or Ctrl-C the server stops accepting connections and finishes the open ones, the sender
//! stops claiming and lets its requests finish, and the queue keeps whatever is left for the next
//! start. Both wait at most `--drain-timeout` (at the same time, not one after the other): the
//! requests to endpoints still in flight then are cut off and recorded as interrupted (see
//! [`crate::dispatch::worker::run`]), so a hanging endpoint delays a stop by the drain timeout,
//! not by its own `timeout`.

pub mod api;
pub mod bindings;
pub mod body;
pub mod listen;
pub mod live;
pub mod metrics;
pub mod open_platform;
pub mod reconcile;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::dispatch::queue::Queue;
use crate::dispatch::worker::{self, Directory, Lookup};
use crate::model::{Secret, SecretPolicy};
use crate::registry::{Registry, SqliteRegistry};
use live::LiveSet;
use metrics::Metrics;
use reconcile::{Reconciler, Report, Settings, Source, Trigger};

/// Writes one log line to standard error, with a timestamp. The message is escaped
/// ([`crate::term::escape`]): it may quote a file, an endpoint or a user, and a log is read in a
/// terminal too; a line break in it cannot start a line that looks like another entry.
pub fn log(message: &str) {
    eprintln!(
        "{} touchctl: {}",
        crate::registry::now(),
        crate::term::escape(message)
    );
}

/// Everything the daemon is started with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The daemon's address as browsers and WeChat reach it, without a trailing `/`; `None` for
    /// `http://<listen address>`.
    pub public_url: Option<String>,
    /// The touchpoint folder.
    pub dir: PathBuf,
    /// The registry file.
    pub state: PathBuf,
    /// The queue file.
    pub queue: PathBuf,
    /// Reconcile the registry with the files, on change and every `interval`.
    pub watch: bool,
    /// Where the files are read.
    pub source: Source,
    /// How often to reconcile even without a file event.
    pub interval: Duration,
    /// Deletes one reconcile may make at most.
    pub max_deletes: usize,
    /// Send to loopback, private and link-local addresses.
    pub allow_private_network: bool,
    /// The API token; `None` only with `insecure_no_auth` on loopback.
    pub token: Option<Secret>,
    /// Serve without a token (loopback only).
    pub insecure_no_auth: bool,
    /// Requests in flight per touchpoint.
    pub concurrency: usize,
    /// Requests in flight in all.
    pub max_in_flight: usize,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Bytes of request bodies held at once (see [`body`]); at least `max_body`.
    pub max_body_memory: usize,
    /// Most recipients the queue holds before triggers get 503.
    pub max_queued: u64,
    /// How long a request may take to send its headers, and its body.
    pub client_timeout: Duration,
    /// API connections served at once; `None` for half the open-file limit (see [`listen`]).
    pub max_connections: Option<usize>,
    /// How long to wait for in-flight work when stopping.
    pub drain: Duration,
    /// How long fully delivered dispatches are kept; zero keeps them all.
    pub retention: Duration,
    /// How long the daemon's hold on its queue lasts unless renewed (see [`crate::lease`]).
    pub lease_ttl: Duration,
    /// What secret references may read.
    pub secrets: SecretPolicy,
}

/// How many triggers are worked on at once: two per core, so one waiting for a lock or a page
/// leaves its core to another, and never so many that the queue's writer thread, which each of
/// them then waits for, gets only a sliver of the cores.
fn intake_permits() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Limits on requests.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest body.
    pub max_body: usize,
    /// Most recipients queued.
    pub max_queued: u64,
    /// Time to receive a body.
    pub body_timeout: Duration,
}

/// What `/v1/status` says about the daemon itself.
#[derive(Clone, Debug)]
pub struct Info {
    /// When it started (RFC 3339).
    pub started_at: String,
    /// For the uptime.
    pub started: Instant,
    /// `worktree` or `git:REF`.
    pub source: String,
    /// The touchpoint folder.
    pub dir: String,
    /// Whether it reconciles.
    pub watch: bool,
    /// The registry.
    pub registry: String,
    /// The queue: its file, or its database.
    pub queue: String,
    /// This daemon's node id when the queue is shared (PostgreSQL).
    pub node: Option<String>,
}

/// The daemon's shared state.
pub struct App {
    /// The registry.
    pub registry: Arc<dyn Registry>,
    /// The queue.
    pub queue: Arc<Queue>,
    /// The live touchpoints.
    pub live: Arc<LiveSet>,
    /// Wakes the sender when there is new work.
    pub wake: Arc<worker::Wake>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The API token.
    pub token: Option<Secret>,
    /// Request limits.
    pub limits: Limits,
    /// About the daemon.
    pub info: Info,
    /// The bytes of request bodies held at once.
    pub bodies: body::Budget,
    /// Triggers being read, checked and handed to the queue at once: at most two per core (see
    /// `intake_permits`). A trigger lets go of its permit before it waits for the disk.
    pub intake: Arc<tokio::sync::Semaphore>,
    /// The daemon's address as browsers and WeChat reach it (`--public-url`), no trailing `/`.
    pub public_url: String,
    /// The bindings in progress and recently finished.
    pub bindings: Mutex<bindings::Table>,
    /// Woken whenever a binding finishes.
    pub bindings_done: tokio::sync::Notify,
    /// When this daemon last received a verify ticket, by platform id (RFC 3339).
    pub tickets_received: Mutex<std::collections::HashMap<String, String>>,
    draining: AtomicBool,
    reconcile: Mutex<Option<Report>>,
}

impl App {
    /// Whether the daemon is stopping.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The last reconcile, if any ran.
    pub fn last_reconcile(&self) -> Option<Report> {
        self.reconcile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The fewest characters an API token may have: 32 hex digits are 128 random bits, out of reach
/// of guessing at any rate the API can answer.
pub const MIN_TOKEN_LEN: usize = 32;

/// Refuses an API token a client could guess, or could not send.
fn check_token(token: &Secret) -> Result<(), StartError> {
    let text = token.expose();
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StartError::UnsendableToken);
    }
    if text.len() < MIN_TOKEN_LEN {
        return Err(StartError::ShortToken(text.len()));
    }
    Ok(())
}

/// Why the daemon could not start, or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No token, and not allowed to run without one.
    #[error(
        "the API needs a token: set TOUCHCTL_API_TOKEN (or --api-token-file FILE); to run without one, listen on a loopback address and pass --insecure-no-auth"
    )]
    NoToken,
    /// The API token is too short to resist guessing.
    #[error(
        "the API token is {0} characters long; it must be at least {MIN_TOKEN_LEN}, from a random source: make one with `openssl rand -hex 32` and set it as TOUCHCTL_API_TOKEN (or write it to the --api-token-file)"
    )]
    ShortToken(usize),
    /// The API token has characters a client cannot send in an `Authorization` header.
    #[error(
        "the API token may hold only visible ASCII characters (no spaces, tabs or line breaks): make one with `openssl rand -hex 32` and set it as TOUCHCTL_API_TOKEN (or write it to the --api-token-file)"
    )]
    UnsendableToken,
    /// The body memory budget cannot hold one body of the largest size.
    #[error(
        "--max-body-memory ({budget} bytes) is smaller than --max-body ({max_body} bytes), so the largest trigger could never be read: raise --max-body-memory or lower --max-body"
    )]
    BodyMemory {
        /// `--max-body-memory`.
        budget: usize,
        /// `--max-body`.
        max_body: usize,
    },
    /// `--insecure-no-auth` on a non-loopback address.
    #[error(
        "--insecure-no-auth is only allowed on a loopback address ({0} is not): anyone who can reach it could dispatch"
    )]
    OpenToTheNetwork(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] crate::dispatch::queue::QueueError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The thread that renews the hold on the queue could not be started.
    #[error("cannot start the thread that renews the hold on the queue: {0}")]
    Heartbeat(std::io::Error),
    /// The daemon lost its hold on the queue, so it stopped.
    #[error(
        "this daemon stopped: it no longer holds the queue ({0}), so another daemon may be working it. Start it again once no other daemon works this queue"
    )]
    LostQueue(String),
}

/// Rebuilds the live set from the registry and holds or releases queued batches to match.
pub async fn refresh(app: &Arc<App>, reread_secrets: bool) {
    update_live(app, move |app| {
        let live = app.registry.list().map_err(|e| e.to_string())?;
        app.live.refresh(&live, reread_secrets);
        Ok(())
    })
    .await;
}

/// Brings the live set up to date for the touchpoints `ids` only (read again from the registry;
/// gone when it no longer holds them), and holds or releases queued batches to match.
async fn refresh_only(app: &Arc<App>, ids: Vec<String>) {
    update_live(app, move |app| {
        let mut rows = Vec::with_capacity(ids.len());
        let mut platforms = Vec::new();
        for id in ids {
            let row = app.registry.get(&id).map_err(|e| e.to_string())?;
            let platform = match &row {
                Some(l) => l.kind == "wechat_open_platform",
                None => app.live.is_platform(&id),
            };
            if platform {
                platforms.push(id.clone());
            }
            rows.push((id, row));
        }
        // The accounts that name a changed platform are opened again with it.
        for platform in platforms {
            for (id, _) in app.live.third_party(&platform, None) {
                if !rows.iter().any(|(r, _)| *r == id) {
                    let row = app.registry.get(&id).map_err(|e| e.to_string())?;
                    rows.push((id, row));
                }
            }
        }
        app.live.update(rows);
        Ok(())
    })
    .await;
}

/// Runs `update` of the live set away from the async threads, then holds or releases queued
/// batches to match and wakes the sender; logs what failed.
async fn update_live(
    app: &Arc<App>,
    update: impl FnOnce(&App) -> Result<(), String> + Send + 'static,
) {
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
        update(&app2)?;
        sync_holds(&app2.queue, app2.live.as_ref()).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(())) => app.wake.anything(),
        Ok(Err(e)) => log(&format!("error: cannot read the registry: {e}")),
        Err(e) => log(&format!("error: {e}")),
    }
}

/// Holds the pending batches of touchpoints that cannot be sent to, and releases the others.
fn sync_holds(
    queue: &Queue,
    live: &dyn Directory,
) -> Result<(), crate::dispatch::queue::QueueError> {
    for (tp, _pending, held) in queue.pending_touchpoints()? {
        match live.lookup(&tp) {
            Lookup::Ready(_) | Lookup::Waiting { .. } if held > 0 => {
                queue.hold(&tp, None)?;
            }
            Lookup::Ready(_) | Lookup::Waiting { .. } => {}
            // A reason of this daemon's own holds nothing in a queue other daemons share.
            Lookup::Held(why, _) if queue.is_shared() && !why.is_registry_wide() => {}
            Lookup::Held(_, reason) => {
                queue.hold(&tp, Some(&reason))?;
            }
        }
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or Ctrl-C. `ready` is called with the bound address once the API
/// is listening.
pub async fn run(config: Config, ready: impl FnOnce(SocketAddr)) -> Result<(), StartError> {
    if let Some(token) = &config.token {
        check_token(token)?;
    } else {
        if !config.insecure_no_auth {
            return Err(StartError::NoToken);
        }
        if !config.listen.ip().is_loopback() {
            return Err(StartError::OpenToTheNetwork(config.listen));
        }
    }
    if config.max_body_memory < config.max_body {
        return Err(StartError::BodyMemory {
            budget: config.max_body_memory,
            max_body: config.max_body,
        });
    }
    // Before anything says the daemon is up (its log line, `ready`): a SIGTERM from then on stops it.
    let stop_signal = shutdown_signal();
    let client = crate::channel::net_guard::client_with(
        config.allow_private_network,
        config.concurrency.max(8),
    )
    .map_err(StartError::Client)?;

    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (registry, queue, hold) = open_state(&config, lost_tx).await?;
    let registry: Arc<dyn Registry> = registry;
    let listener = listen::bind(config.listen).map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    // Platform tokens are kept in the registry: one node's token is every node's.
    let tokens = crate::channel::token::Tokens::shared(
        Arc::new(crate::channel::token::RegistryTokens(registry.clone())),
        queue.postgres().map_or_else(
            || format!("{}-{}", crate::registry::hostname(), std::process::id()),
            |q| q.node().to_string(),
        ),
        log,
    );
    let app = Arc::new(App {
        registry: registry.clone(),
        queue: queue.clone(),
        live: Arc::new(
            LiveSet::new(config.secrets.clone())
                .with_tokens(tokens)
                .with_platforms(live::PlatformNetwork {
                    tickets: Arc::new(crate::registry::Tickets(registry.clone())),
                    client: client.clone(),
                    allow_private: config.allow_private_network,
                }),
        ),
        wake: Arc::new(worker::Wake::default()),
        metrics: Arc::new(Metrics::for_node(queue.postgres().map(|q| q.node()))),
        token: config.token.clone(),
        limits: Limits {
            max_body: config.max_body,
            max_queued: config.max_queued,
            body_timeout: config.client_timeout,
        },
        info: Info {
            started_at: crate::registry::now(),
            started: Instant::now(),
            source: config.source.to_string(),
            dir: config.dir.display().to_string(),
            watch: config.watch,
            registry: registry.describe(),
            queue: queue.describe(),
            node: queue.postgres().map(|q| q.node().to_string()),
        },
        bodies: body::Budget::new(config.max_body_memory),
        intake: Arc::new(tokio::sync::Semaphore::new(intake_permits())),
        public_url: config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        bindings: Mutex::new(bindings::Table::default()),
        bindings_done: tokio::sync::Notify::new(),
        tickets_received: Mutex::default(),
        draining: AtomicBool::new(false),
        reconcile: Mutex::new(None),
    });
    let reconciler = config.watch.then(|| {
        Arc::new(Mutex::new(Reconciler::new(Settings {
            dir: config.dir.clone(),
            source: config.source.clone(),
            max_deletes: config.max_deletes,
            secrets: config.secrets.clone(),
        })))
    });
    // Watch before the first reconcile: an edit made while it runs must not be missed.
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let watcher = reconciler.as_ref().and_then(|r| {
        let settings = r
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settings()
            .clone();
        match watch_files(&settings, events_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                log(&format!(
                    "error: cannot watch {} ({e}); reconciling every {} only",
                    settings.dir.display(),
                    humantime::format_duration(config.interval)
                ));
                None
            }
        }
    });
    if let Some(r) = &reconciler {
        reconcile_now(&app, r, Trigger::Everything).await;
    }
    refresh(&app, true).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = tokio::spawn(worker::run(
        queue.clone(),
        app.live.clone(),
        app.metrics.clone(),
        client,
        worker::Config {
            concurrency: config.concurrency.max(1),
            max_in_flight: config.max_in_flight.max(1),
            allow_private_network: config.allow_private_network,
            drain: config.drain,
        },
        app.wake.clone(),
        stop_rx.clone(),
    ));
    let supervisor = tokio::spawn(supervise(
        app.clone(),
        reconciler,
        events,
        config.interval,
        stop_rx.clone(),
    ));
    let pruner = (!config.retention.is_zero()).then(|| {
        tokio::spawn(prune(
            queue.clone(),
            app.metrics.clone(),
            config.retention,
            stop_rx.clone(),
        ))
    });
    tokio::spawn(release_memory(queue.clone(), stop_rx.clone()));
    let (max_connections, warning) =
        listen::max_connections(config.max_connections, listen::open_file_limit());
    if let Some(w) = warning {
        log(&w);
    }
    let server = tokio::spawn(serve(
        listener,
        api::router(app.clone()),
        stop_rx,
        config.client_timeout,
        config.drain,
        max_connections,
    ));
    log(&format!(
        "listening on http://{addr} (source {}, {}, registry {}, queue {})",
        config.source,
        if config.watch {
            "watching"
        } else {
            "not watching"
        },
        registry.describe(),
        queue.describe()
    ));
    if queue.is_shared() {
        let q = queue.clone();
        let (host, listen, started) = (
            crate::registry::hostname(),
            addr.to_string(),
            app.info.started_at.clone(),
        );
        let registered = tokio::task::spawn_blocking(move || match q.postgres() {
            Some(q) => q.register(&host, &listen, &started),
            None => Ok(()),
        })
        .await;
        if let Ok(Err(e)) = registered {
            log(&format!(
                "error: cannot list this daemon among the cluster's nodes: {e}"
            ));
        }
    }
    ready(addr);

    let lost = tokio::select! {
        () = stop_signal => None,
        Some(why) = lost_rx.recv() => Some(why),
    };
    match &lost {
        None => {
            log("stopping: no new connections; finishing open requests and in-flight deliveries")
        }
        Some(why) => log(&format!(
            "error: this daemon no longer holds the queue ({why}); another daemon may be working it, so this one stops: no new connections; finishing open requests and in-flight deliveries"
        )),
    }
    app.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = worker.await;
    let _ = supervisor.await;
    if let Some(p) = pruner {
        let _ = p.await;
    }
    drop(watcher);
    drop(hold.heartbeat);
    let left = match (&hold.lease_id, queue.as_ref()) {
        (Some(lease_id), Queue::Sqlite(q)) => q.leave_daemon_slot(lease_id),
        (_, Queue::Postgres(q)) => q.leave(),
        _ => Ok(()),
    };
    if let Err(e) = left {
        log(&format!("error: {e}"));
    }
    log("stopped");
    match lost {
        None => Ok(()),
        Some(why) => Err(StartError::LostQueue(why)),
    }
}

/// What keeps this daemon's hold on its queue: the heartbeat renewing it, and (SQLite) the id of
/// the daemon slot to leave when stopping.
struct Hold {
    heartbeat: crate::lease::Heartbeat,
    lease_id: Option<String>,
}

/// Connections a daemon keeps to PostgreSQL: its intake (two per core), claims, records, the
/// heartbeat and the API's reads.
const POSTGRES_POOL: usize = 16;

/// Opens the registry and the queue `--state` names, and takes this daemon's hold on the queue:
/// the SQLite queue's daemon slot (one daemon per file), or a node of the PostgreSQL cluster,
/// whose heartbeat renews its batch leases. A hold that is lost is sent on `lost` (SQLite: the
/// daemon stops); a PostgreSQL heartbeat that fails for a lease term is logged, and the daemon
/// goes on: its records are fenced, so a batch another daemon took over is that daemon's.
async fn open_state(
    config: &Config,
    lost: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<(Arc<dyn Registry>, Arc<Queue>, Hold), StartError> {
    if let Some(url) = config
        .state
        .to_str()
        .filter(|s| crate::registry::is_postgres_url(s))
    {
        let url = url.to_string();
        let ttl = config.lease_ttl;
        let opened = tokio::task::spawn_blocking(move || {
            let registry = Arc::new(crate::registry::PostgresRegistry::open_with_pool(
                &url,
                POSTGRES_POOL,
            )?);
            let node = format!(
                "{}-{}-{}",
                crate::registry::hostname(),
                std::process::id(),
                crate::store::random_hex(3)
            );
            let queue = crate::dispatch::queue::PostgresQueue::open(registry.clone(), node, ttl)?;
            Ok::<_, StartError>((registry, queue))
        })
        .await
        .map_err(|e| StartError::Heartbeat(std::io::Error::other(e.to_string())))??;
        let (registry, queue) = opened;
        let queue = Arc::new(Queue::Postgres(queue));
        let heartbeat = {
            let queue = queue.clone();
            crate::lease::Heartbeat::start(
                "node-heartbeat",
                ttl,
                Box::new(move |_| match queue.postgres() {
                    Some(q) => q.beat().map(|_| true).map_err(|e| e.to_string()),
                    None => Ok(true),
                }),
                |why| {
                    log(&format!(
                        "error: this daemon's batch leases were not renewed ({why}); other daemons may take its batches over (sent again under the same webhook-id). It goes on, and renews them again once the database answers"
                    ));
                },
            )
            .map_err(StartError::Heartbeat)?
        };
        let registry: Arc<dyn Registry> = registry;
        return Ok((
            registry,
            queue,
            Hold {
                heartbeat,
                lease_id: None,
            },
        ));
    }
    let registry = Arc::new(SqliteRegistry::create(&config.state)?);
    registry.frugal()?;
    let sqlite = crate::dispatch::queue::SqliteQueue::open(&config.queue)?;
    let taken = sqlite.take_daemon_slot(config.lease_ttl)?;
    if let Some((gone, standing)) = &taken.replaced {
        log(&format!(
            "took over the queue from a daemon that is gone ({gone}): {}; its unfinished batches are sent again",
            standing.why_free()
        ));
    }
    let queue = Arc::new(Queue::Sqlite(sqlite));
    let heartbeat = {
        let (queue, lease_id) = (queue.clone(), taken.lease_id.clone());
        crate::lease::Heartbeat::start(
            "queue-lease",
            config.lease_ttl,
            Box::new(move |expires_at| match queue.sqlite() {
                Some(q) => q
                    .renew_daemon_slot(&lease_id, expires_at)
                    .map_err(|e| e.to_string()),
                None => Ok(true),
            }),
            move |why| {
                let _ = lost.send(why);
            },
        )
        .map_err(StartError::Heartbeat)?
    };
    let registry: Arc<dyn Registry> = registry;
    Ok((
        registry,
        queue,
        Hold {
            heartbeat,
            lease_id: Some(taken.lease_id),
        },
    ))
}

/// On a timer: drops the recipients kept in memory past their age limit (otherwise dropped only
/// when the next trigger comes), then hands memory unused for the allocator's purge delay back to
/// the OS (the allocator itself looks for such memory only when it allocates, and a daemon held it
/// long after a load).
async fn release_memory(queue: Arc<Queue>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(crate::allocator::RELEASE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let queue = queue.clone();
        let _ = tokio::task::spawn_blocking(move || {
            queue.expire_fresh();
            crate::allocator::release_unused();
        })
        .await;
    }
}

/// Forgets fully delivered dispatches older than `retention`, checking every hour (or every
/// `retention`, when that is shorter), a few hundred per transaction so claims are never held up.
async fn prune(
    queue: Arc<Queue>,
    observer: Arc<dyn worker::Observer>,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    const PER_TRANSACTION: usize = 200;
    let every = retention.clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let keep_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let before = crate::store::now_ms().saturating_sub(keep_ms);
        let mut forgotten = 0;
        loop {
            let q = queue.clone();
            let pruned = tokio::task::spawn_blocking(move || q.prune(before, PER_TRANSACTION))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match pruned {
                Ok(n) => {
                    forgotten += n;
                    if n < PER_TRANSACTION || *stop.borrow() {
                        break;
                    }
                }
                Err(e) => {
                    observer.problem(&format!("cannot forget old dispatches: {e}"));
                    break;
                }
            }
        }
        if forgotten > 0 {
            log(&format!(
                "forgot {forgotten} fully delivered dispatch(es) older than {} (--retention)",
                humantime::format_duration(retention)
            ));
        }
    }
}

/// SIGTERM or Ctrl-C. The handlers are installed when this is called, not when the future is
/// first polled: a signal that comes right after the daemon says it listens must stop it, not
/// kill it with the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Ok(mut term), Err(_)) => {
                    term.recv().await;
                }
                (Err(_), _) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs one reconcile, makes its result visible, and brings the live view up to date with what
/// it wrote.
async fn reconcile_now(app: &Arc<App>, reconciler: &Arc<Mutex<Reconciler>>, trigger: Trigger) {
    let registry = app.registry.clone();
    let r = reconciler.clone();
    let ran = tokio::task::spawn_blocking(move || {
        let version = registry.data_version().ok();
        r.lock()
            .unwrap_or_else(|p| p.into_inner())
            .run(&trigger, registry.as_ref(), version)
    })
    .await;
    let (report, written) = match ran {
        Ok((report, written)) => (report, Some(written)),
        Err(e) => (
            Report {
                at: crate::registry::now(),
                error: Some(e.to_string()),
                ..Report::default()
            },
            None,
        ),
    };
    let previous = app
        .reconcile
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(report.clone());
    // Log changes, new problems and recoveries, not the same problem every interval.
    let was_failing = previous.as_ref().is_some_and(|p| p.error.is_some());
    let repeated = previous.is_some_and(|p| p.error.is_some() && p.error == report.error);
    if report.changed() || (report.error.is_some() && !repeated) || (was_failing && report.ok) {
        log(&report.line());
        for d in report.diagnostics.iter().take(20) {
            log(&format!("  {d}"));
        }
    }
    app.metrics.reconciled(report.ok);
    // Writes by other processes are noticed apart (see `supervise`).
    match written {
        Some(ids) if ids.is_empty() => {}
        Some(ids) if ids.len() <= REFRESH_ONE_BY_ONE => refresh_only(app, ids).await,
        _ => refresh(app, false).await,
    }
}

/// Up to this many touchpoints written by a reconcile are read again one by one for the live view;
/// more, and the whole registry is read.
const REFRESH_ONE_BY_ONE: usize = 64;

/// How long the files must be quiet after an event before a reconcile reads them: editors and
/// tools write a file in several steps (a temporary file, a rename, a truncate and a write), a
/// few milliseconds apart, and one reconcile should see them all.
const QUIET: Duration = Duration::from_millis(50);

/// A tree that keeps changing is reconciled at least this often.
const BURST_AT_MOST: Duration = Duration::from_secs(1);

/// The file events gathered into one reconcile.
#[derive(Default)]
struct Burst {
    paths: std::collections::BTreeSet<PathBuf>,
    /// The watcher lost events (its queue overflowed) or failed: read everything.
    lost: bool,
}

impl Burst {
    fn add(&mut self, event: notify::Result<notify::Event>) {
        match event {
            Ok(e) if e.need_rescan() => self.lost = true,
            Ok(e) => self.paths.extend(e.paths),
            Err(e) => {
                log(&format!(
                    "error: watching the files: {e}; reading every file again"
                ));
                self.lost = true;
            }
        }
    }

    fn trigger(self) -> Trigger {
        if self.lost {
            Trigger::Everything
        } else {
            Trigger::Changed(self.paths.into_iter().collect())
        }
    }
}

/// Gathers the events that follow `first` until the files have been quiet for [`QUIET`] (or
/// [`BURST_AT_MOST`] has passed); `None` when the daemon is stopping.
async fn gather(
    first: notify::Result<notify::Event>,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Trigger> {
    let mut burst = Burst::default();
    burst.add(first);
    let until = tokio::time::Instant::now() + BURST_AT_MOST;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(until);
        tokio::select! {
            event = events.recv() => match event {
                Some(e) => burst.add(e),
                None => return Some(burst.trigger()),
            },
            _ = tokio::time::sleep_until(quiet) => return Some(burst.trigger()),
            _ = stop.changed() => return None,
        }
    }
}

/// How often the registry's data version is read for changes made elsewhere.
const DATA_VERSION_POLL: Duration = Duration::from_millis(250);

/// Reconciles on file events and every `interval`, and notices registry writes by other processes.
async fn supervise(
    app: Arc<App>,
    reconciler: Option<Arc<Mutex<Reconciler>>>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    // Pause, resume and applies made through another process or daemon are noticed by polling
    // the registry's data version (one small read): within a quarter of a second, which keeps
    // every daemon sharing a registry within a second of each other.
    let mut poll = tokio::time::interval(DATA_VERSION_POLL);
    let mut seen = app.registry.data_version().ok();
    loop {
        tokio::select! {
            Some(first) = events.recv() => {
                let Some(trigger) = gather(first, &mut events, &mut stop).await else {
                    break;
                };
                if let Some(r) = &reconciler {
                    reconcile_now(&app, r, trigger).await;
                }
            }
            _ = tick.tick() => {
                if let Some(r) = &reconciler {
                    reconcile_now(&app, r, Trigger::Everything).await;
                }
                // Periodically re-read secrets too: a rotated secret file takes effect.
                refresh(&app, true).await;
                let queue = app.queue.clone();
                let _ = tokio::task::spawn_blocking(move || queue.refresh_pending()).await;
            }
            _ = poll.tick() => {
                let registry = app.registry.clone();
                let now = tokio::task::spawn_blocking(move || registry.data_version().ok()).await.ok().flatten();
                if now != seen {
                    seen = now;
                    refresh(&app, false).await;
                }
            }
            _ = stop.changed() => break,
        }
    }
}

/// Watches the touchpoint folder (or, for a git source, the repository's git folder, where refs
/// move) and sends every event that may be a change, or the watcher's error, as it comes.
fn watch_files(
    settings: &Settings,
    tx: tokio::sync::mpsc::UnboundedSender<notify::Result<notify::Event>>,
) -> Result<notify::RecommendedWatcher, String> {
    use notify::Watcher;
    let path: PathBuf = match &settings.source {
        Source::Worktree => settings.dir.clone(),
        Source::Git(_) => git2::Repository::discover(&settings.dir)
            .map(|r| r.path().to_path_buf())
            .map_err(|e| e.message().to_string())?,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening, reading and closing a file change nothing; and every reconcile opens files
        // and folders, so taking those events for changes would start the next one, for ever.
        if event.as_ref().is_ok_and(|e| e.kind.is_access()) {
            return;
        }
        let _ = tx.send(event);
    })
    .map_err(|e| e.to_string())?;
    watcher
        .watch(Path::new(&path), notify::RecursiveMode::Recursive)
        .map_err(|e| e.to_string())?;
    Ok(watcher)
}

/// Serves HTTP/1.1 until `stop`, at most `max_connections` connections at once (the next ones
/// wait in the listen queue), pausing after failed accepts (see [`listen`]) and cutting off clients
/// that take longer than `client_timeout` to send their headers; then finishes the open
/// connections (up to `drain`).
async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
    client_timeout: Duration,
    drain: Duration,
    max_connections: usize,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut backoff = listen::Backoff::default();
    let mut full = listen::FullLog::default();
    loop {
        if slots.available_permits() == 0
            && let Some(line) = full.full(max_connections, Instant::now())
        {
            log(&line);
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) if listen::is_connection_error(&e) => continue,
            Err(e) => {
                let (pause, line) = backoff.failed(&e, Instant::now());
                if let Some(line) = line {
                    log(&line);
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(client_timeout)
            .keep_alive(true);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        log("some API connections were still open after the drain timeout; closed them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_reads_are_not_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("touchpoints");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.toml"), "id = \"a\"\n").unwrap();
        std::fs::write(dir.join("sub/b.toml"), "id = \"b\"\n").unwrap();
        let settings = Settings {
            dir: dir.clone(),
            source: Source::Worktree,
            max_deletes: 5,
            secrets: crate::model::SecretPolicy::default(),
        };
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let _watcher = watch_files(&settings, tx).unwrap();
        // What every reconcile does: walk the folders, open and read every file.
        let _ = crate::load::load_dir(&dir);
        // Then one change. Events come in order, so the first one must be this change's.
        std::fs::write(dir.join("sentinel.toml"), "id = \"s\"\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match events.try_recv() {
                Ok(Ok(event)) => {
                    assert!(
                        event.paths.iter().any(|p| p.ends_with("sentinel.toml")),
                        "reading the files was taken for a change: {event:?}"
                    );
                    return;
                }
                Ok(Err(e)) => panic!("the watcher failed: {e}"),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    assert!(Instant::now() < deadline, "the change was never seen");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
