//! The sender: claims due batches from the queue, sends each to its touchpoint as the registry has
//! it *now* (the generation is recorded with every attempt), and records the outcome.
//!
//! Per touchpoint there is a lane: at most `concurrency` requests in flight and, with a
//! `rate_limit`, no more requests than it allows. Batches claimed beyond what a lane may start wait
//! in memory. A claimed batch stays busy (never claimed again) until its outcome is recorded. Outcomes are recorded in groups by one recorder task, so a busy
//! daemon writes one transaction per group, not one per batch. A batch whose touchpoint is paused,
//! disabled or gone is held in the queue, never dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};

use super::Rejected;
use super::queue::{After, At, Claimed, Completion, Lanes, Queue, Users};
use super::recipient::Mapping;
use super::retry::{self, Next};
use super::stored::{parse_stored, store};
use super::trigger::UserRef;
use crate::channel::{Channel, Message, Outgoing, Report, Rest, Signal, net_guard};
use crate::store::now_ms;

/// Tells the sender there may be work it has not claimed: new batches of a touchpoint (a trigger),
/// or anything else (a reload, a resume, a retry to schedule). Knowing the touchpoints lets the
/// sender leave the queue alone when each of them already has a full lane: asking then would walk
/// that touchpoint's whole backlog only to leave it out, and with a deep backlog that walk on
/// every trigger costs more than the sending. Such a lane asks for more when it runs low.
#[derive(Default)]
pub struct Wake {
    notify: Notify,
    news: std::sync::Mutex<News>,
}

/// What changed since the sender last looked.
#[derive(Default)]
struct News {
    /// Anything at all: the sender asks the queue.
    anything: bool,
    /// Touchpoints with new batches.
    queued: HashSet<String>,
}

impl Wake {
    /// New batches of `touchpoint` are in the queue.
    pub fn queued(&self, touchpoint: &str) {
        {
            let mut news = self.lock();
            if !news.anything && !news.queued.contains(touchpoint) {
                news.queued.insert(touchpoint.to_string());
            }
        }
        self.notify.notify_one();
    }

    /// Something other than new batches changed: the sender asks the queue.
    pub fn anything(&self) {
        {
            let mut news = self.lock();
            news.anything = true;
            news.queued.clear();
        }
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, News> {
        // Each change is whole before the lock is let go: a poisoned lock holds consistent news.
        self.news.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the news calls for a claim, given the touchpoints whose full lanes the last claim
    /// left out (each of those asks again when its lane runs low); the news is then taken.
    fn wants_claim(&self, left_out: &[String]) -> bool {
        let news = std::mem::take(&mut *self.lock());
        news.anything || news.queued.iter().any(|tp| !left_out.contains(tp))
    }
}

/// A live touchpoint, ready to send to.
pub struct Target {
    /// The touchpoint id.
    pub id: String,
    /// The registry generation these settings are from.
    pub generation: u64,
    /// Its channel, secrets resolved.
    pub channel: Arc<dyn Channel>,
    /// Its dynamic params, prepared for writing recipients.
    pub mapping: Mapping,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why a touchpoint is not sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Paused through the API.
    Paused,
    /// `enabled = false`.
    Disabled,
    /// The platform rejected its configuration (see [`Signal::Hold`]).
    Platform,
    /// Its spec or secrets cannot be used by this touchctl.
    Unavailable,
    /// Not in the registry.
    Gone,
}

impl Why {
    /// Whether every daemon sharing a queue sees the same: the registry says so (paused,
    /// disabled, gone), rather than this daemon's own view of its secrets or of a platform.
    pub fn is_registry_wide(self) -> bool {
        matches!(self, Why::Paused | Why::Disabled | Why::Gone)
    }
}

/// Where a touchpoint stands for sending.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// Live and enabled: send with these settings.
    Ready(Arc<Target>),
    /// Live, but the platform asked to wait (a rate limit, a daily quota): its batches are due
    /// again at `until` (ms since the epoch). Triggers are still accepted.
    Waiting {
        /// Its settings.
        target: Arc<Target>,
        /// When sending resumes.
        until: i64,
        /// What the platform said.
        reason: String,
    },
    /// Not sendable now; its batches wait, held with this reason.
    Held(Why, String),
}

/// The live touchpoints, as the daemon keeps them current.
pub trait Directory: Send + Sync + 'static {
    /// Where `touchpoint` stands.
    fn lookup(&self, touchpoint: &str) -> Lookup;
    /// The platform said `signal` of `touchpoint` as it was at `generation`: hold it, or make it
    /// wait. A signal about an older generation than the live one is ignored.
    fn signal(&self, touchpoint: &str, generation: u64, signal: &Signal);
    /// The live touchpoint ids (for did-you-mean hints).
    fn ids(&self) -> Vec<String>;
    /// A number that changes whenever what `lookup` answers may change other than by time
    /// passing (a wait running out), so that what is worked out from every touchpoint can be kept
    /// until it does; `None` when the directory cannot tell, and it is worked out every time.
    fn changes(&self) -> Option<u64> {
        None
    }
}

/// What the worker reports as it goes (metrics, logs).
pub trait Observer: Send + Sync + 'static {
    /// One attempt finished.
    fn attempt(
        &self,
        touchpoint: &str,
        outcome: &'static str,
        latency: Duration,
        delivered: u32,
        failed: u32,
    );
    /// A trigger-to-first-attempt delay, for batches sent the first time.
    fn first_attempt_delay(&self, delay: Duration);
    /// Something went wrong that no request caused (the queue file failed, say).
    fn problem(&self, message: &str);
    /// The queue was asked for batches and gave `batches`.
    fn claimed(&self, _batches: usize) {}
    /// A platform held a touchpoint or made it wait.
    fn signal(&self, _touchpoint: &str, _signal: &Signal) {}
}

/// How hard the worker pushes.
#[derive(Clone, Debug)]
pub struct Config {
    /// Requests in flight to one touchpoint at most.
    pub concurrency: usize,
    /// Requests in flight in all at most (and batches held in memory).
    pub max_in_flight: usize,
    /// Send to loopback, private and link-local addresses (tests, local sinks).
    pub allow_private_network: bool,
    /// How long to wait for in-flight requests when stopping.
    pub drain: Duration,
}

/// A token bucket: `rate` requests per second, bursts of up to one second's worth.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: rate.max(1.0),
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        self.at = now;
    }

    /// Takes a token if one is there; otherwise says when one will be.
    fn take(&mut self, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate.max(f64::MIN_POSITIVE);
            Err(now + Duration::from_secs_f64(wait.min(3600.0)))
        }
    }
}

#[derive(Default)]
struct Lane {
    in_flight: usize,
    waiting: VecDeque<Claimed>,
    bucket: Option<Bucket>,
    /// The rate the bucket was made for, to notice a changed `rate_limit`.
    rate: Option<f64>,
}

/// How the batches of a touchpoint that cannot be sent to now wait in the queue.
enum Park {
    /// Held with this reason until the touchpoint is released. The flag says whether the reason
    /// is the registry's (paused, disabled, gone), and so true for every daemon sharing the queue;
    /// a reason of this daemon's own (a secret it cannot read) holds nothing in a shared queue:
    /// this daemon lets the batches go and leaves them to the others.
    Held(String, bool),
    /// Due again at this time (ms since the epoch).
    Until(i64),
}

/// The settings to send with, or how the touchpoint's batches wait.
fn sendable(lookup: Lookup) -> Result<Arc<Target>, Park> {
    match lookup {
        Lookup::Ready(t) => Ok(t),
        Lookup::Waiting { until, .. } => Err(Park::Until(until)),
        Lookup::Held(why, reason) => Err(Park::Held(reason, why.is_registry_wide())),
    }
}

impl Park {
    async fn apply(self, queue: &Arc<Queue>, touchpoint: &str, observer: &dyn Observer) {
        let tp = touchpoint.to_string();
        let result = match self {
            Park::Held(_, false) if queue.is_shared() => Ok(0),
            Park::Held(reason, _) => run_blocking(queue, move |q| q.hold(&tp, Some(&reason))).await,
            Park::Until(at) => run_blocking(queue, move |q| q.defer(&tp, at)).await,
        };
        if let Err(e) = result {
            observer.problem(&format!("cannot hold batches: {e}"));
        }
    }
}

/// How long requests cut off at the end of a drain get to record their interruption before their
/// tasks are aborted (which leaves their batches pending, unrecorded, as a crash would).
const CUT_GRACE: Duration = Duration::from_secs(1);

/// The sender, running until `stop` turns true; then it stops claiming and lets in-flight requests
/// finish, for up to `Config::drain`. Requests still in flight then are cut off (their connections
/// closed) and recorded as interrupted: their batches stay pending and are sent again on the next
/// start, so stopping never waits for a touchpoint's timeout.
pub async fn run(
    queue: Arc<Queue>,
    directory: Arc<dyn Directory>,
    observer: Arc<dyn Observer>,
    client: reqwest::Client,
    config: Config,
    wake: Arc<Wake>,
    mut stop: watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let (record_tx, record_rx) = mpsc::unbounded_channel::<Completion>();
    // The batches claimed and not yet recorded: never claimed twice.
    let busy: Busy = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let recorder = tokio::spawn(record(
        queue.clone(),
        record_rx,
        observer.clone(),
        wake.clone(),
        busy.clone(),
        stop.clone(),
    ));
    let mut lanes: HashMap<String, Lane> = HashMap::new();
    let mut in_flight = 0usize;
    let mut waiting = 0usize;
    // Turns true when the drain timeout runs out: requests still in flight give up then.
    let (cut_tx, cut_rx) = watch::channel(false);
    let mut sends = tokio::task::JoinSet::new();
    let shared = Arc::new(Shared {
        queue: queue.clone(),
        directory: directory.clone(),
        client,
        allow_private: config.allow_private_network,
        record: record_tx,
        observer: observer.clone(),
        busy: busy.clone(),
        cut: cut_rx,
        drain: config.drain,
    });
    // The queue is asked for work only when there may be some it has not given yet: at the
    // start, when woken (a trigger, a retry on record, a resume, ...), when a timer falls due,
    // when the last claim was cut short by its limit, or when a lane that was left out of the last
    // claim (it had enough waiting) runs low. A send finishing alone changes nothing in the queue.
    let mut must_claim = true;
    let mut left_out: Vec<String> = Vec::new();
    let mut due_at: Option<Instant> = None;
    // Due batches a shared queue left at a cluster-wide limit are asked for again then.
    let mut capped_at: Option<Instant> = None;
    let shared_queue = queue.is_shared();
    // The cluster-wide limits and the touchpoints left to other daemons, as of a directory version.
    let mut lanes_seen: Option<(Option<u64>, Lanes, Vec<String>)> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        // Forget the tasks that finished (their outcome went through `done_rx`).
        while sends.try_join_next().is_some() {}
        while let Ok(tp) = done_rx.try_recv() {
            in_flight -= 1;
            if let Some(lane) = lanes.get_mut(&tp) {
                lane.in_flight -= 1;
            }
        }
        must_claim = must_claim
            || left_out.iter().any(|tp| {
                lanes
                    .get(tp)
                    .is_none_or(|l| l.waiting.len() < config.concurrency)
            });
        // Claim what the lanes can take.
        let room = config.max_in_flight.saturating_sub(in_flight + waiting);
        let claiming = room > 0 && must_claim;
        if claiming {
            let full: Vec<String> = lanes
                .iter()
                .filter(|(_, l)| l.waiting.len() >= config.concurrency)
                .map(|(k, _)| k.clone())
                .collect();
            left_out.clone_from(&full);
            let limit = room.min(256);
            let busy_now = busy_ids(&busy);
            let mut full = full;
            let limits = if queue.is_shared() {
                // Worked out from every touchpoint: kept while the directory does not change.
                let version = directory.changes();
                let (limits, local) = match &lanes_seen {
                    Some((v, limits, local)) if version.is_some() && *v == version => {
                        (limits.clone(), local.clone())
                    }
                    _ => {
                        let worked = cluster_lanes(directory.as_ref(), config.concurrency);
                        lanes_seen = Some((version, worked.0.clone(), worked.1.clone()));
                        worked
                    }
                };
                full.extend(local);
                limits
            } else {
                Lanes::default()
            };
            let claimed = run_blocking(&queue, move |q| {
                let skip: Vec<&str> = full.iter().map(String::as_str).collect();
                let busy: Vec<&str> = busy_now.iter().map(String::as_str).collect();
                q.claim(now_ms(), limit, &skip, &busy, &limits)
            })
            .await;
            match claimed {
                Ok(claim) => {
                    capped_at = claim.capped_until.and_then(|at| {
                        Instant::now().checked_add(Duration::from_millis(
                            u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0),
                        ))
                    });
                    let batches = claim.batches;
                    observer.claimed(batches.len());
                    must_claim = batches.len() >= limit;
                    {
                        let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
                        b.extend(batches.iter().map(|c| c.id.clone()));
                    }
                    for b in batches {
                        waiting += 1;
                        lanes
                            .entry(b.touchpoint.clone())
                            .or_default()
                            .waiting
                            .push_back(b);
                    }
                }
                Err(e) => {
                    // Tried again when the timer below falls due.
                    observer.problem(&format!("cannot claim batches: {e}"));
                    must_claim = false;
                }
            }
        }
        // Start what each lane may start now.
        let now = Instant::now();
        let mut next_token: Option<Instant> = None;
        let mut held = Vec::new();
        for (tp, lane) in lanes.iter_mut() {
            if lane.waiting.is_empty() {
                continue;
            }
            let target = match sendable(directory.lookup(tp)) {
                Ok(t) => t,
                Err(park) => {
                    waiting -= lane.waiting.len();
                    held.push((tp.clone(), park, std::mem::take(&mut lane.waiting)));
                    continue;
                }
            };
            // A shared queue paces the cluster when it hands out batches: no bucket here.
            let rate = if shared_queue {
                None
            } else {
                target.channel.rate_limit()
            };
            if lane.rate != rate {
                lane.rate = rate;
                lane.bucket = rate.map(Bucket::new);
            }
            while lane.in_flight < config.concurrency && !lane.waiting.is_empty() {
                if let Some(bucket) = &mut lane.bucket
                    && let Err(at) = bucket.take(now)
                {
                    next_token = Some(next_token.map_or(at, |n: Instant| n.min(at)));
                    break;
                }
                let Some(batch) = lane.waiting.pop_front() else {
                    break;
                };
                waiting -= 1;
                lane.in_flight += 1;
                in_flight += 1;
                let shared = shared.clone();
                let done = done_tx.clone();
                sends.spawn(async move {
                    let tp = batch.touchpoint.clone();
                    shared.send(batch).await;
                    let _ = done.send(tp);
                });
            }
        }
        for (tp, park, batches) in held {
            park.apply(&queue, &tp, observer.as_ref()).await;
            let ids: Vec<String> = batches.into_iter().map(|b| b.id).collect();
            release(&queue, ids.clone(), observer.as_ref()).await;
            let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids {
                b.remove(&id);
            }
        }
        lanes.retain(|_, l| l.in_flight > 0 || !l.waiting.is_empty() || l.bucket.is_some());
        // Sleep until something can move: a send finishing, new work, a token, a retry falling due.
        let mut until = Instant::now() + Duration::from_secs(1);
        if let Some(t) = next_token {
            until = until.min(t);
        }
        if let Some(t) = capped_at {
            until = until.min(t);
        }
        if must_claim && room > 0 {
            until = Instant::now();
        } else if claiming {
            // Everything due was claimed: wake up when the next batch falls due. Batches of the
            // lanes the claim left out are not waited for (those lanes ask when they run low):
            // their backlog is due already, and waking for it would only claim nothing again.
            let busy_now = busy_ids(&busy);
            let skip = left_out.clone();
            due_at = match run_blocking(&queue, move |q| {
                let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
                let busy: Vec<&str> = busy_now.iter().map(String::as_str).collect();
                q.next_due(now_ms(), &skip, &busy)
            })
            .await
            {
                Ok(Some(due)) => Instant::now().checked_add(Duration::from_millis(
                    u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0),
                )),
                _ => None,
            };
        }
        if let Some(due) = due_at {
            until = until.min(due);
        }
        tokio::select! {
            _ = wake.notify.notified() => must_claim = must_claim || wake.wants_claim(&left_out),
            Some(tp) = done_rx.recv() => {
                in_flight -= 1;
                if let Some(lane) = lanes.get_mut(&tp) {
                    lane.in_flight -= 1;
                }
            }
            _ = tokio::time::sleep_until(until.into()) => {
                must_claim = true;
                due_at = None;
                capped_at = None;
            }
            _ = stop.changed() => {}
        }
    }
    // Drain: let in-flight requests finish (each records its outcome), up to the drain timeout.
    // A drain timeout too long to add to the clock is no limit.
    let deadline = Instant::now().checked_add(config.drain);
    in_flight -= finished_by(&mut done_rx, in_flight, deadline).await;
    if in_flight > 0 {
        observer.problem(&format!(
            "{in_flight} request(s) still in flight after the drain timeout ({}): cut off and recorded as interrupted; their batches are sent again on the next start",
            humantime::format_duration(config.drain)
        ));
        let _ = cut_tx.send(true);
        // Each records its interruption at once; anything still running after a moment is
        // aborted, its batch left pending as after a crash.
        let grace = Instant::now().checked_add(CUT_GRACE);
        in_flight -= finished_by(&mut done_rx, in_flight, grace).await;
        if in_flight > 0 {
            observer.problem(&format!(
                "{in_flight} request(s) did not stop when cut off; aborted unrecorded, their batches are sent again on the next start"
            ));
        }
    }
    sends.shutdown().await;
    drop(shared);
    let _ = recorder.await;
}

/// Waits until `in_flight` sends have finished or `deadline` (if any) passes; returns how many did.
async fn finished_by(
    done: &mut mpsc::UnboundedReceiver<String>,
    in_flight: usize,
    deadline: Option<Instant>,
) -> usize {
    let mut finished = 0;
    while finished < in_flight {
        let next = match deadline {
            Some(at) => tokio::time::timeout_at(at.into(), done.recv())
                .await
                .ok()
                .flatten(),
            None => done.recv().await,
        };
        if next.is_none() {
            break;
        }
        finished += 1;
    }
    finished
}

/// The limits a claim from a shared queue keeps to: `concurrency` per touchpoint, and the
/// `rate_limit` of each live touchpoint that has one; and the touchpoints this daemon cannot send
/// to for reasons of its own (left to the other daemons).
fn cluster_lanes(directory: &dyn Directory, concurrency: usize) -> (Lanes, Vec<String>) {
    let mut rates = Vec::new();
    let mut skip = Vec::new();
    for id in directory.ids() {
        match directory.lookup(&id) {
            Lookup::Ready(t) | Lookup::Waiting { target: t, .. } => {
                if let Some(r) = t.channel.rate_limit() {
                    rates.push((id, r));
                }
            }
            Lookup::Held(why, _) if !why.is_registry_wide() => skip.push(id),
            Lookup::Held(..) => {}
        }
    }
    (Lanes { concurrency, rates }, skip)
}

/// Lets go of claimed batches that were not sent (a no-op unless the queue is shared).
async fn release(queue: &Arc<Queue>, ids: Vec<String>, observer: &dyn Observer) {
    if !queue.is_shared() || ids.is_empty() {
        return;
    }
    if let Err(e) = run_blocking(queue, move |q| q.release(&ids)).await {
        // Their leases then run out instead, and another claim takes them.
        observer.problem(&format!("cannot release claimed batches: {e}"));
    }
}

async fn run_blocking<T: Send + 'static>(
    queue: &Arc<Queue>,
    f: impl FnOnce(&Queue) -> Result<T, super::queue::QueueError> + Send + 'static,
) -> Result<T, super::queue::QueueError> {
    let queue = queue.clone();
    match tokio::task::spawn_blocking(move || f(&queue)).await {
        Ok(r) => r,
        Err(e) => Err(super::queue::QueueError::Io {
            path: String::new(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// The ids of the batches being sent (claimed, not yet recorded).
type Busy = Arc<std::sync::Mutex<HashSet<String>>>;

fn busy_ids(busy: &Busy) -> Vec<String> {
    busy.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect()
}

/// Records completions in groups until every sender is gone; a batch stays busy until its
/// outcome is on record. A failing write is tried again every second; once the daemon is stopping
/// it is given up, which is safe: an unrecorded batch is still pending, and is sent again (same
/// `webhook-id`) on the next start.
async fn record(
    queue: Arc<Queue>,
    mut rx: mpsc::UnboundedReceiver<Completion>,
    observer: Arc<dyn Observer>,
    wake: Arc<Wake>,
    busy: Busy,
    stop: watch::Receiver<bool>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < 512 {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        loop {
            let g = group.clone();
            match run_blocking(&queue, move |q| q.record(g)).await {
                Ok(()) => break,
                Err(e) if *stop.borrow() => {
                    observer.problem(&format!(
                        "cannot record {} delivery outcome(s) while stopping ({e}); those batches are sent again on the next start",
                        group.len()
                    ));
                    break;
                }
                Err(e) => {
                    observer.problem(&format!("cannot record deliveries (retrying): {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        {
            let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
            for c in &group {
                b.remove(&c.batch_id);
            }
        }
        // A batch to retry is due again some time: the sender's timer must know. On a shared
        // queue, every record also frees places the cluster-wide limits count.
        if queue.is_shared() || group.iter().any(|c| matches!(c.after, After::RetryAt(_))) {
            wake.anything();
        }
    }
}

/// What every send task shares.
struct Shared {
    queue: Arc<Queue>,
    directory: Arc<dyn Directory>,
    client: reqwest::Client,
    allow_private: bool,
    record: mpsc::UnboundedSender<Completion>,
    observer: Arc<dyn Observer>,
    busy: Busy,
    /// True once the drain timeout ran out: requests in flight give up.
    cut: watch::Receiver<bool>,
    /// The drain timeout, for the record of an interrupted attempt.
    drain: Duration,
}

impl Shared {
    async fn send(&self, mut batch: Claimed) {
        // The touchpoint as it is now, not as it was when the batch was queued or claimed.
        let target = match sendable(self.directory.lookup(&batch.touchpoint)) {
            Ok(t) => t,
            Err(park) => {
                park.apply(&self.queue, &batch.touchpoint, self.observer.as_ref())
                    .await;
                release(&self.queue, vec![batch.id.clone()], self.observer.as_ref()).await;
                self.busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&batch.id);
                return;
            }
        };
        let started_ms = now_ms();
        let started = Instant::now();
        let attempt = batch.attempts + 1;
        // Recipients written when the batch was queued serve as long as the touchpoint's dynamic
        // params are those they were written with; otherwise the stored users are read.
        let (wire, stored) =
            match std::mem::replace(&mut batch.users, Users::Stored(Ok(Vec::new()))) {
                Users::Fresh(wire, at) if wire.generation == target.generation => {
                    (Some((wire, at)), Ok(Vec::new()))
                }
                Users::Fresh(_, at) => (None, self.read_users(at).await),
                Users::Stored(stored) => (None, stored),
            };
        let parsed = match &stored {
            Ok(stored) if wire.is_none() => parse_stored(stored).map_err(|e| unreadable(&e)),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(e.clone()),
        };
        let users: &[UserRef<'_>] = parsed.as_deref().unwrap_or_default();
        let recipients = match &wire {
            Some((wire, _)) => wire.count,
            None => users.len() as u32,
        };
        let message: Result<Message, String> = match &batch.message {
            None => Ok(Message::default()),
            Some(text) => serde_json::from_str(text).map_err(|e| unreadable(&e.to_string())),
        };
        let ready = match (&parsed, &message) {
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
            (Ok(_), Ok(message)) => self
                .guard(target.channel.endpoint())
                .await
                .map(|()| message),
        };
        let report = match ready {
            Err(error) => Some(Report::dead(None, error)),
            Ok(message) => {
                let written;
                let recipient_bytes: &[u8] = match &wire {
                    Some((wire, _)) => &wire.recipients,
                    None => {
                        let refs: Vec<&UserRef<'_>> = users.iter().collect();
                        written = super::recipient::recipients(&refs, &target.mapping);
                        &written
                    }
                };
                unless_cut(
                    &self.cut,
                    target.channel.send(Outgoing {
                        client: &self.client,
                        batch_id: &batch.id,
                        touchpoint: &batch.touchpoint,
                        campaign: &batch.campaign,
                        dispatch_id: &batch.dispatch_id,
                        index: batch.index,
                        count: batch.count,
                        template_params: &batch.template_params,
                        message,
                        recipients: recipient_bytes,
                        recipient_count: recipients,
                    }),
                )
                .await
            }
        };
        // Cut off: the request was dropped, which closed its connection. The platform may or may
        // not have taken the batch, as after a timeout; it comes again with the same batch id.
        let Some(report) = report else {
            let latency = started.elapsed();
            let completion =
                interrupted(&batch, &target, recipients, started_ms, latency, self.drain);
            self.observer
                .attempt(&batch.touchpoint, "interrupted", latency, 0, 0);
            let _ = self.record.send(completion);
            return;
        };
        let latency = started.elapsed();
        if attempt == 1 {
            let queued_ms = batch_created_ms(&batch.id);
            if let Some(q) = queued_ms {
                self.observer
                    .first_attempt_delay(Duration::from_millis((started_ms - q).max(0) as u64));
            }
        }
        if let Some(signal) = &report.signal {
            self.directory
                .signal(&batch.touchpoint, target.generation, signal);
            self.observer.signal(&batch.touchpoint, signal);
        }
        // A partial answer to recipients sent from memory: which ones to retry is worked out from
        // the stored users, read now.
        let late = match &wire {
            Some((_, at)) if !report.misses.is_empty() => Some(self.read_users(at.clone()).await),
            _ => None,
        };
        let late_parsed = late.as_ref().map(|stored| match stored {
            Ok(stored) => parse_stored(stored).map_err(|e| unreadable(&e)),
            Err(e) => Err(e.clone()),
        });
        let (report, users) = match (&late_parsed, report) {
            (Some(Err(e)), report) => (
                Report {
                    misses: Vec::new(),
                    rest: Rest::Retry { after: None },
                    error: Some(format!(
                        "{} recipient(s) were not delivered, and the batch's stored users cannot be read to retry only those ({e}): the whole batch is tried again",
                        report.misses.len()
                    )),
                    ..report
                },
                users,
            ),
            (Some(Ok(late)), report) => (report, late.as_slice()),
            (None, report) => (report, users),
        };
        let completion = outcome(
            &batch, &target, recipients, users, report, started_ms, latency,
        );
        let label = match completion.after {
            After::Done if completion.delivered == 0 && !completion.failed.is_empty() => "failed",
            After::Done => "delivered",
            After::RetryAt(_) if completion.delivered > 0 => "partial",
            After::RetryAt(_) => "retry",
            After::Dead => "dead",
            After::Interrupted => "interrupted",
            After::Parked(_) => "held",
            After::Deferred(_) => "deferred",
        };
        self.observer.attempt(
            &batch.touchpoint,
            label,
            latency,
            completion.delivered,
            completion.failed.len() as u32,
        );
        // The recorder outlives every sender.
        let _ = self.record.send(completion);
    }

    /// Reads the stored users of a batch claimed from memory, off the async threads.
    async fn read_users(&self, at: At) -> Result<Vec<u8>, String> {
        run_blocking(&self.queue, move |q| Ok(q.read_users(&at)))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    }

    /// Refuses endpoints on non-public networks unless allowed (see [`net_guard`]).
    async fn guard(&self, url: &str) -> Result<(), String> {
        if self.allow_private {
            return Ok(());
        }
        net_guard::check_url(url).await.map_err(|e| e.to_string())
    }
}

/// The creation time encoded in a batch id (`dsp_<ms hex>..._<index>`).
fn batch_created_ms(id: &str) -> Option<i64> {
    let hex = id.strip_prefix("dsp_")?.get(..11)?;
    i64::from_str_radix(hex, 16).ok()
}

fn unreadable(e: &str) -> String {
    format!("the stored batch cannot be read ({e}); this is a touchctl bug, please report it")
}

/// `work`'s output, or `None` if the drain timeout runs out first (`cut` turns true), which drops
/// `work` unfinished.
async fn unless_cut<T>(
    cut: &watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut cut = cut.clone();
    tokio::select! {
        done = work => Some(done),
        // A sender gone is a stop as well.
        _ = cut.wait_for(|cut| *cut) => None,
    }
}

/// The record of an attempt cut off by the end of a drain (see [`After::Interrupted`]).
fn interrupted(
    batch: &Claimed,
    target: &Target,
    recipients: u32,
    started_ms: i64,
    latency: Duration,
    drain: Duration,
) -> Completion {
    Completion {
        batch_id: batch.id.clone(),
        attempt: batch.attempts + 1,
        generation: target.generation,
        started_ms,
        latency_ms: i64::try_from(latency.as_millis()).unwrap_or(i64::MAX),
        status: None,
        recipients,
        delivered: 0,
        failed: Vec::new(),
        remaining: None,
        after: After::Interrupted,
        error: Some(format!(
            "interrupted: the daemon was stopping and its drain timeout ({}) ran out before the endpoint answered; the batch is sent again (same webhook-id) when the daemon next starts",
            humantime::format_duration(drain)
        )),
    }
}

/// Turns a channel's report into the batch's next state. `users` are the batch's users when the
/// report names recipients (or when they were read to send them); `recipients` how many were sent.
fn outcome(
    batch: &Claimed,
    target: &Target,
    recipients: u32,
    users: &[UserRef<'_>],
    report: Report,
    started_ms: i64,
    latency: Duration,
) -> Completion {
    let attempt = batch.attempts + 1;
    let policy = target.channel.retry();
    let mut c = Completion {
        batch_id: batch.id.clone(),
        attempt,
        generation: target.generation,
        started_ms,
        latency_ms: i64::try_from(latency.as_millis()).unwrap_or(i64::MAX),
        status: report.status,
        recipients,
        delivered: 0,
        failed: Vec::new(),
        remaining: None,
        after: After::Dead,
        error: report.error,
    };
    let retry_after = match &report.rest {
        Rest::Retry { after } => *after,
        _ => None,
    };
    // Where recipients left to send go: parked or deferred at the platform's word, otherwise
    // retried under the touchpoint's policy.
    let again = match &report.signal {
        Some(Signal::Hold { reason, .. }) => After::Parked(reason.clone()),
        Some(Signal::Wait { wait, .. }) => After::Deferred(retry::due_at(now_ms(), *wait)),
        None => match retry::next(&policy, attempt, retry_after, retry::unit()) {
            Next::RetryAfter(d) => After::RetryAt(retry::due_at(now_ms(), d)),
            Next::DeadLetter => After::Dead,
        },
    };
    if report.misses.is_empty() {
        match report.rest {
            Rest::Delivered => {
                c.delivered = recipients;
                c.after = After::Done;
            }
            Rest::Retry { .. } => c.after = again,
            Rest::Dead => c.after = After::Dead,
        }
        return c;
    }
    let sent: HashSet<&str> = users.iter().map(|u| u.id.as_ref()).collect();
    let mut retry_ids = HashSet::new();
    let mut failed_ids = HashSet::new();
    for m in &report.misses {
        // Only recipients of this batch count; anything else the platform says is noise.
        if !sent.contains(m.user_id.as_str()) {
            continue;
        }
        if m.retry {
            retry_ids.insert(m.user_id.as_str());
        } else if failed_ids.insert(m.user_id.as_str()) {
            c.failed.push(Rejected {
                user_id: m.user_id.clone(),
                reason: m.reason.clone(),
            });
        }
    }
    let named = |u: &&UserRef<'_>| {
        let id = u.id.as_ref();
        !failed_ids.contains(id) && (retry_ids.contains(id) || report.rest != Rest::Delivered)
    };
    let left: Vec<&UserRef<'_>> = users.iter().filter(named).collect();
    c.delivered = (users.len() - left.len() - c.failed.len()) as u32;
    if left.is_empty() {
        c.after = After::Done;
        return c;
    }
    if c.error.is_none() {
        c.error = Some(format!(
            "{} recipient(s) to retry, as the endpoint asked",
            left.len()
        ));
    }
    c.remaining = Some((store(left.iter().copied()), left.len() as u32));
    c.after = if report.rest == Rest::Dead {
        After::Dead
    } else {
        again
    };
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts claims; the rest is not looked at.
    #[derive(Default)]
    struct Claims(std::sync::atomic::AtomicUsize);

    impl Observer for Claims {
        fn attempt(&self, _: &str, _: &'static str, _: Duration, _: u32, _: u32) {}
        fn first_attempt_delay(&self, _: Duration) {}
        fn problem(&self, _: &str) {}
        fn claimed(&self, _: usize) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    struct One(Arc<Target>);

    impl Directory for One {
        fn lookup(&self, _: &str) -> Lookup {
            Lookup::Ready(self.0.clone())
        }
        fn signal(&self, _: &str, _: u64, _: &Signal) {}
        fn ids(&self) -> Vec<String> {
            vec![self.0.id.clone()]
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_lane_does_not_make_the_sender_claim_over_and_over() {
        // A sink that takes 20 ms per request: one lane (concurrency 1) holds the sender's whole
        // room of 16 batches, and 184 more wait in the queue behind it, due already.
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = answered.clone();
        let app = axum::Router::new().fallback(move || {
            let counter = counter.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                "{}"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let spec: crate::model::CustomSpec = toml::from_str(&format!(
            "url = \"{url}\"\nallow_insecure = true\nauth_token = {{ env = \"UNUSED\" }}\nbatch_size = 1\n"
        ))
        .unwrap();
        let target = Target {
            id: "slow".into(),
            generation: 1,
            mapping: super::super::recipient::Mapping::new(&spec.dynamic_params),
            channel: Arc::new(crate::channel::custom::CustomChannel::new(
                spec,
                crate::model::Secret::new("t"),
                None,
            )),
        };
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(Queue::open(&dir.path().join("queue.db")).unwrap());
        let text = format!(
            "[{}]",
            (0..200)
                .map(|i| format!("{{\"user_id\":\"u{i}\"}}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let users = super::super::stored::parse_users_json(text.as_bytes()).unwrap();
        let head = super::super::TriggerHead {
            touchpoint: "slow".into(),
            campaign: "c".into(),
            ..Default::default()
        };
        queue
            .enqueue(super::super::queue::NewDispatch {
                head: &head,
                generation: 1,
                batch_size: 1,
                users: users.iter().collect(),
                rejected: Vec::new(),
                wire: None,
            })
            .unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let claims = Arc::new(Claims::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let worker = tokio::spawn(run(
            queue.clone(),
            Arc::new(One(Arc::new(target))),
            claims.clone(),
            reqwest::Client::new(),
            Config {
                concurrency: 1,
                max_in_flight: 16,
                allow_private_network: true,
                drain: Duration::from_secs(5),
            },
            Arc::new(Wake::default()),
            stop_rx,
        ));
        // Sends are the clock: the lane runs low (and asks for more) every 15 or 16 of them.
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 64 {
            assert!(
                Instant::now() < deadline,
                "the sink never answered 64 requests"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let n = claims.0.load(std::sync::atomic::Ordering::Relaxed);
        let sent = answered.load(std::sync::atomic::Ordering::SeqCst);
        stop_tx.send(true).unwrap();
        worker.await.unwrap();
        // One claim to start; each time the lane runs low (every 15 sends) one claim that refills
        // it and one more that finds it full again; one a second on the timer. Claiming whenever
        // a send finished would be a claim per send; claiming in a loop while the lane is full
        // (what the sender once did), hundreds.
        let most = 2 + 2 * sent.div_ceil(15) + elapsed.as_secs() as usize;
        assert!(
            (1..=most).contains(&n),
            "{n} claims for {sent} sends in {elapsed:?} (at most {most})"
        );
    }

    #[test]
    fn new_batches_of_a_left_out_lane_do_not_call_for_a_claim() {
        let wake = Wake::default();
        let left_out = vec!["sms".to_string()];
        assert!(!wake.wants_claim(&left_out), "no news");
        wake.queued("sms");
        assert!(
            !wake.wants_claim(&left_out),
            "its lane asks for more when it runs low"
        );
        wake.queued("sms");
        wake.queued("push");
        assert!(wake.wants_claim(&left_out), "another touchpoint has work");
        assert!(!wake.wants_claim(&left_out), "the news was taken");
        wake.queued("sms");
        assert!(wake.wants_claim(&[]), "no lane was left out");
        wake.anything();
        wake.queued("sms");
        assert!(wake.wants_claim(&left_out), "anything else always claims");
    }

    #[test]
    fn buckets_pace_requests() {
        let start = Instant::now();
        let mut b = Bucket::new(2.0);
        assert!(b.take(start).is_ok());
        assert!(b.take(start).is_ok());
        let next = b.take(start).unwrap_err();
        assert_eq!(next.duration_since(start), Duration::from_millis(500));
        assert!(b.take(start + Duration::from_millis(500)).is_ok());
    }

    fn claimed() -> Claimed {
        Claimed {
            id: "dsp_0000000000a_0".into(),
            dispatch_id: "dsp_0000000000a".into(),
            index: 0,
            count: 1,
            touchpoint: "sms".into(),
            users: Users::Stored(Ok(Vec::new())),
            remaining: 3,
            attempts: 0,
            campaign: "c".into(),
            template_params: "{}".into(),
            message: None,
        }
    }

    fn target() -> Target {
        let spec: crate::model::CustomSpec =
            toml::from_str("url = \"https://x.example.com\"\nauth_token = { env = \"UNUSED\" }\n")
                .unwrap();
        Target {
            id: "sms".into(),
            generation: 7,
            mapping: Mapping::new(&spec.dynamic_params),
            channel: Arc::new(crate::channel::custom::CustomChannel::new(
                spec,
                crate::model::Secret::new("t"),
                None,
            )),
        }
    }

    fn miss(id: &str, retry: bool) -> crate::channel::Miss {
        crate::channel::Miss {
            user_id: id.into(),
            retry,
            reason: format!("43004 require subscribe ({id})"),
        }
    }

    fn report(misses: Vec<crate::channel::Miss>, rest: Rest, signal: Option<Signal>) -> Report {
        Report {
            status: Some(200),
            misses,
            rest,
            error: None,
            signal,
        }
    }

    fn remaining_ids(c: &Completion) -> Vec<String> {
        let (stored, n) = c.remaining.as_ref().expect("remaining users");
        let users = parse_stored(stored).unwrap();
        assert_eq!(users.len(), *n as usize);
        users.iter().map(|u| u.id.to_string()).collect()
    }

    #[test]
    fn a_report_becomes_the_batch_s_next_state() {
        let text = br#"[{"user_id":"u1"},{"user_id":"u2"},{"user_id":"u3"}]"#;
        let users = super::super::stored::parse_users_json(text).unwrap();
        let (b, t) = (claimed(), target());
        let run = |r: Report| outcome(&b, &t, 3, &users, r, 0, Duration::ZERO);

        // Named misses, everyone else delivered; an id not in the batch is noise.
        let c = run(report(
            vec![miss("u1", false), miss("u2", true), miss("stranger", false)],
            Rest::Delivered,
            None,
        ));
        assert_eq!(c.delivered, 1);
        assert_eq!(c.failed.len(), 1);
        assert_eq!(c.failed[0].user_id, "u1");
        assert!(c.failed[0].reason.starts_with("43004"));
        assert_eq!(remaining_ids(&c), ["u2"]);
        assert!(matches!(c.after, After::RetryAt(_)));
        assert_eq!(c.generation, 7);

        // The others to retry: only the failed one is settled.
        let c = run(report(
            vec![miss("u1", false)],
            Rest::Retry { after: None },
            None,
        ));
        assert_eq!((c.delivered, c.failed.len()), (0, 1));
        assert_eq!(remaining_ids(&c), ["u2", "u3"]);

        // Every named recipient settled: done.
        let c = run(report(vec![miss("u3", false)], Rest::Delivered, None));
        assert_eq!((c.delivered, c.after.clone()), (2, After::Done));

        // Dead: the rest is kept for a replay.
        let c = run(report(vec![miss("u1", false)], Rest::Dead, None));
        assert_eq!(c.after, After::Dead);
        assert_eq!(remaining_ids(&c), ["u2", "u3"]);

        // A hold parks what is left, uncounted, with the platform's reason.
        let hold = Signal::Hold {
            code: "40125".into(),
            reason: "40125 invalid appsecret".into(),
        };
        let c = run(report(
            vec![],
            Rest::Retry { after: None },
            Some(hold.clone()),
        ));
        assert_eq!(c.after, After::Parked("40125 invalid appsecret".into()));
        assert!(c.remaining.is_none(), "the batch keeps its users");
        let c = run(report(vec![miss("u3", true)], Rest::Delivered, Some(hold)));
        assert_eq!(c.delivered, 2);
        assert_eq!(remaining_ids(&c), ["u3"]);
        assert!(matches!(c.after, After::Parked(_)));

        // A wait defers what is left to its end.
        let before = now_ms();
        let c = run(report(
            vec![],
            Rest::Retry { after: None },
            Some(Signal::Wait {
                wait: Duration::from_secs(60),
                code: "45011".into(),
                reason: "45011 api minute-quota reach limit".into(),
            }),
        ));
        match c.after {
            After::Deferred(at) => assert!(at >= before + 60_000 && at <= now_ms() + 60_000),
            other => panic!("{other:?}"),
        }

        // Nothing named and delivered: the count comes from the request, not the users.
        let c = outcome(
            &b,
            &t,
            500,
            &[],
            Report::delivered(Some(200)),
            0,
            Duration::ZERO,
        );
        assert_eq!((c.delivered, c.after), (500, After::Done));
    }

    #[test]
    fn batch_ids_carry_their_creation_time() {
        assert_eq!(batch_created_ms("dsp_0000000000a1b2c3d4e5f6_3"), Some(10));
    }
}
