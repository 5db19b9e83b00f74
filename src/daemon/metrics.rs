//! `/metrics` in the Prometheus text format, and the worker's [`Observer`] that feeds it (and the
//! log).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::channel::Signal;
use crate::dispatch::queue::Stats;
use crate::dispatch::worker::Observer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    touchpoint: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tp {
    touchpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Found {
    found: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    touchpoint: String,
    signal: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlatformEvent {
    platform: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
    code: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    attempts: Family<Outcome, Counter>,
    delivered: Family<Tp, Counter>,
    failed: Family<Tp, Counter>,
    accepted: Family<Tp, Counter>,
    rejected: Family<Tp, Counter>,
    requests: Family<Status, Counter>,
    signals: Family<SignalLabel, Counter>,
    states: Family<StateLabel, Gauge>,
    platform_events: Family<PlatformEvent, Counter>,
    latency: Histogram,
    first_attempt: Histogram,
    pending_batches: Gauge,
    pending_recipients: Gauge,
    held_batches: Gauge,
    dead_batches: Gauge,
    live_touchpoints: Gauge,
    intake_waiting: Gauge,
    claims_found_some: Counter,
    claims_found_none: Counter,
    reconcile_failures: Counter,
    reconcile_ok: Gauge,
    problems: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::for_node(None)
    }
}

impl Metrics {
    /// The metrics of a daemon; with `node` (daemons sharing a PostgreSQL queue), every series
    /// carries the label `node` naming it, so a cluster's scrapes add up and tell nodes apart.
    pub fn for_node(node: Option<&str>) -> Self {
        let labels = node
            .map(|n| {
                (
                    std::borrow::Cow::Borrowed("node"),
                    std::borrow::Cow::Owned(n.to_string()),
                )
            })
            .into_iter();
        let mut registry = Registry::with_prefix_and_labels("touchctl", labels);
        let attempts = Family::<Outcome, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts, by touchpoint and outcome (delivered, failed, partial, retry, interrupted, dead, held: its platform refused the configuration, deferred: its platform asked to wait)",
            attempts.clone(),
        );
        let signals = Family::<SignalLabel, Counter>::default();
        registry.register(
            "platform_signals",
            "Touchpoints held (signal=hold: the platform refused the configuration) or made to wait (signal=wait: a rate limit or quota) by their platform, by the platform's code",
            signals.clone(),
        );
        let states = Family::<StateLabel, Gauge>::default();
        registry.register(
            "touchpoints",
            "Live touchpoints by state (ready, paused, held, waiting) and, when their platform held them or made them wait, its code",
            states.clone(),
        );
        let platform_events = Family::<PlatformEvent, Counter>::default();
        registry.register(
            "open_platform_events",
            "Pushes to a live open platform's event URL, by platform and event (component_verify_ticket: WeChat sends one every 10 minutes, so an hour without one is worth an alert; authorized, updateauthorized, unauthorized, other; refused: a bad signature or payload)",
            platform_events.clone(),
        );
        let delivered = Family::<Tp, Counter>::default();
        registry.register(
            "recipients_delivered",
            "Recipients delivered",
            delivered.clone(),
        );
        let failed = Family::<Tp, Counter>::default();
        registry.register(
            "recipients_failed",
            "Recipients the endpoint refused for good",
            failed.clone(),
        );
        let accepted = Family::<Tp, Counter>::default();
        registry.register(
            "recipients_accepted",
            "Recipients accepted by POST /v1/dispatch",
            accepted.clone(),
        );
        let rejected = Family::<Tp, Counter>::default();
        registry.register(
            "recipients_rejected",
            "Recipients rejected by POST /v1/dispatch (missing attributes, duplicates)",
            rejected.clone(),
        );
        let requests = Family::<Status, Counter>::default();
        registry.register(
            "dispatch_requests",
            "POST /v1/dispatch requests, by HTTP status",
            requests.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "delivery_latency_seconds",
            "Time one delivery request took",
            latency.clone(),
        );
        let first_attempt = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "trigger_to_first_attempt_seconds",
            "Time from a trigger being accepted to its batch's first attempt",
            first_attempt.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let pending_batches = gauge(
            &mut registry,
            "queue_pending_batches",
            "Batches waiting or in flight",
        );
        let pending_recipients = gauge(
            &mut registry,
            "queue_pending_recipients",
            "Recipients waiting or in flight",
        );
        let held_batches = gauge(
            &mut registry,
            "queue_held_batches",
            "Pending batches held: touchpoint paused, disabled or gone",
        );
        let dead_batches = gauge(&mut registry, "queue_dead_batches", "Dead-lettered batches");
        let live_touchpoints = gauge(
            &mut registry,
            "live_touchpoints",
            "Touchpoints in the registry",
        );
        let intake_waiting = gauge(
            &mut registry,
            "intake_waiting",
            "Triggers received and waiting for their turn to be read and stored (a few per core are at once); a lasting value means the daemon is short of CPU",
        );
        let claims = Family::<Found, Counter>::default();
        registry.register(
            "queue_claims",
            "Times the sender asked the queue for due batches, by whether it found any (found=\"none\" growing as fast as found=\"some\" means the sender is asking in vain)",
            claims.clone(),
        );
        // Both series exist from the start, and a claim only bumps a counter it already holds.
        let claims_found_some = claims.get_or_create(&Found { found: "some" }).clone();
        let claims_found_none = claims.get_or_create(&Found { found: "none" }).clone();
        let reconcile_failures = Counter::default();
        registry.register(
            "reconcile_failures",
            "Reconciles that changed nothing because the files or the plan had problems",
            reconcile_failures.clone(),
        );
        let problems = Counter::default();
        registry.register(
            "problems",
            "Problems no request caused (the queue file failing to write, say); each one is in the log",
            problems.clone(),
        );
        let reconcile_ok = Gauge::default();
        registry.register(
            "reconcile_ok",
            "1 when the last reconcile succeeded, 0 when it failed",
            reconcile_ok.clone(),
        );
        Self {
            registry,
            attempts,
            delivered,
            failed,
            accepted,
            rejected,
            requests,
            signals,
            states,
            platform_events,
            latency,
            first_attempt,
            pending_batches,
            pending_recipients,
            held_batches,
            dead_batches,
            live_touchpoints,
            intake_waiting,
            claims_found_some,
            claims_found_none,
            reconcile_failures,
            reconcile_ok,
            problems,
        }
    }
}

impl Metrics {
    /// The text exposition, with the queue gauges set from `stats`.
    pub fn render(&self, stats: &Stats, touchpoints: &[super::live::Summary]) -> String {
        let live = touchpoints.len();
        self.states.clear();
        for s in touchpoints {
            self.states
                .get_or_create(&StateLabel {
                    state: s.state,
                    code: s.code.clone().unwrap_or_default(),
                })
                .inc();
        }
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.pending_batches, stats.pending_batches);
        set(&self.pending_recipients, stats.pending_recipients);
        set(&self.held_batches, stats.held_batches);
        set(&self.dead_batches, stats.dead_batches);
        set(&self.live_touchpoints, live as u64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A trigger is waiting for its turn at the intake, until the returned guard is dropped
    /// (its turn came, or its client went away).
    pub fn waiting_for_intake(&self) -> IntakeWaiting<'_> {
        self.intake_waiting.inc();
        IntakeWaiting(&self.intake_waiting)
    }

    /// A dispatch request was answered.
    pub fn request(&self, status: u16) {
        self.requests
            .get_or_create(&Status {
                status: status.to_string(),
            })
            .inc();
    }

    /// Recipients were accepted and rejected for a touchpoint.
    pub fn accepted(&self, touchpoint: &str, accepted: usize, rejected: usize) {
        let tp = Tp {
            touchpoint: touchpoint.to_string(),
        };
        self.accepted.get_or_create(&tp).inc_by(accepted as u64);
        self.rejected.get_or_create(&tp).inc_by(rejected as u64);
    }

    /// A push to the event URL of the live open platform `platform`: `event` is its `InfoType`
    /// (`other` for one touchctl does not act on) or `refused`.
    pub fn platform_event(&self, platform: &str, event: &'static str) {
        self.platform_events
            .get_or_create(&PlatformEvent {
                platform: platform.to_string(),
                event,
            })
            .inc();
    }

    /// A reconcile finished.
    pub fn reconciled(&self, ok: bool) {
        if !ok {
            self.reconcile_failures.inc();
        }
        self.reconcile_ok.set(i64::from(ok));
    }
}

impl Observer for Metrics {
    fn attempt(
        &self,
        touchpoint: &str,
        outcome: &'static str,
        latency: Duration,
        delivered: u32,
        failed: u32,
    ) {
        self.attempts
            .get_or_create(&Outcome {
                touchpoint: touchpoint.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        let tp = Tp {
            touchpoint: touchpoint.to_string(),
        };
        if delivered > 0 {
            self.delivered
                .get_or_create(&tp)
                .inc_by(u64::from(delivered));
        }
        if failed > 0 {
            self.failed.get_or_create(&tp).inc_by(u64::from(failed));
        }
        self.latency.observe(latency.as_secs_f64());
        if outcome == "dead" {
            crate::daemon::log(&format!("batch to `{touchpoint}` dead-lettered"));
        }
    }

    fn first_attempt_delay(&self, delay: Duration) {
        self.first_attempt.observe(delay.as_secs_f64());
    }

    fn problem(&self, message: &str) {
        self.problems.inc();
        crate::daemon::log(&format!("error: {message}"));
    }

    fn signal(&self, touchpoint: &str, signal: &Signal) {
        let (kind, what) = match signal {
            Signal::Hold { .. } => (
                "hold",
                "held: the platform refused its configuration; its batches are parked until a changed spec or secret is applied, or it is resumed",
            ),
            Signal::Wait { .. } => ("wait", "waiting: the platform asked to slow down"),
        };
        self.signals
            .get_or_create(&SignalLabel {
                touchpoint: touchpoint.to_string(),
                signal: kind,
                code: signal.code().to_string(),
            })
            .inc();
        let wait = match signal {
            Signal::Wait { wait, .. } => format!(" for {}", humantime::format_duration(*wait)),
            Signal::Hold { .. } => String::new(),
        };
        crate::daemon::log(&format!("`{touchpoint}` {what}{wait} ({})", signal.said()));
    }

    fn claimed(&self, batches: usize) {
        if batches == 0 {
            self.claims_found_none.inc();
        } else {
            self.claims_found_some.inc();
        }
    }
}

/// Counts a trigger in `touchctl_intake_waiting` while it lives.
pub struct IntakeWaiting<'a>(&'a Gauge);

impl Drop for IntakeWaiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Signal;
    use crate::dispatch::worker::Observer;

    #[test]
    fn problems_are_counted_for_alerting() {
        let m = Metrics::default();
        let stats = Stats {
            pending_batches: 2,
            pending_recipients: 900,
            held_batches: 0,
            dead_batches: 1,
            dead_recipients: 500,
        };
        assert!(
            m.render(&stats, &[])
                .contains("touchctl_problems_total 0\n")
        );
        m.problem("cannot record deliveries (retrying): disk full");
        let text = m.render(&stats, &[]);
        assert!(text.contains("touchctl_problems_total 1\n"), "{text}");
        assert!(
            text.contains("touchctl_queue_pending_recipients 900\n"),
            "{text}"
        );
    }

    fn summary(id: &str, state: &'static str, code: Option<&str>) -> super::super::live::Summary {
        super::super::live::Summary {
            id: id.into(),
            kind: "wechat_official_account".into(),
            generation: 1,
            enabled: true,
            paused: state == "paused",
            ready: matches!(state, "ready" | "waiting"),
            state,
            held: None,
            code: code.map(str::to_string),
            until: None,
            commit: None,
            granted: None,
            missing: None,
        }
    }

    #[test]
    fn touchpoints_are_counted_by_state_and_platform_code() {
        let m = Metrics::default();
        let text = m.render(
            &Stats::default(),
            &[
                summary("a", "ready", None),
                summary("b", "ready", None),
                summary("c", "held", Some("40125")),
                summary("d", "waiting", Some("45009")),
                summary("e", "paused", None),
            ],
        );
        for line in [
            "touchctl_touchpoints{state=\"ready\",code=\"\"} 2\n",
            "touchctl_touchpoints{state=\"held\",code=\"40125\"} 1\n",
            "touchctl_touchpoints{state=\"waiting\",code=\"45009\"} 1\n",
            "touchctl_touchpoints{state=\"paused\",code=\"\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // A touchpoint released since is not counted held any more.
        let text = m.render(&Stats::default(), &[summary("c", "ready", None)]);
        assert!(!text.contains("state=\"held\""), "{text}");
        m.signal(
            "c",
            &Signal::Hold {
                code: "40125".into(),
                reason: "invalid appsecret".into(),
            },
        );
        let text = m.render(&Stats::default(), &[]);
        assert!(
            text.contains("touchctl_platform_signals_total{touchpoint=\"c\",signal=\"hold\",code=\"40125\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn claims_are_counted_by_whether_they_found_work() {
        let m = Metrics::default();
        let count = |m: &Metrics, found: &str| {
            let text = m.render(&Stats::default(), &[]);
            let prefix = format!("touchctl_queue_claims_total{{found=\"{found}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("no `{prefix}` in {text}"))
        };
        m.claimed(3);
        m.claimed(0);
        m.claimed(1);
        assert_eq!(count(&m, "some"), "2");
        assert_eq!(count(&m, "none"), "1");
    }

    #[test]
    fn triggers_waiting_for_the_intake_are_counted_while_they_wait() {
        let m = Metrics::default();
        let stats = Stats::default();
        let waiting = |m: &Metrics| {
            let text = m.render(&stats, &[]);
            text.lines()
                .find_map(|l| l.strip_prefix("touchctl_intake_waiting "))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("no intake gauge in {text}"))
        };
        assert_eq!(waiting(&m), "0");
        let a = m.waiting_for_intake();
        let b = m.waiting_for_intake();
        assert_eq!(waiting(&m), "2");
        drop(a);
        assert_eq!(waiting(&m), "1");
        drop(b);
        assert_eq!(waiting(&m), "0");
    }
}
