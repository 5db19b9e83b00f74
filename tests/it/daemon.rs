//! The daemon end to end: the real binary, real HTTP sinks on loopback, real files and queue.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::{Backend, on_both_backends};
use crate::daemon_support::{
    Arrivals, Daemon, PATIENCE, Sink, custom_touchpoint, holding_the_first, http, users,
};
use crate::support::{Project, repo_root};

// The delivery suite runs on both backends: the daemon's queue in its SQLite file, and in
// PostgreSQL (`--state postgres://`), where a daemon claims under leases.
on_both_backends!(
    ten_thousand_users_arrive_as_batches_of_batch_size_with_their_params,
    a_sink_failing_half_its_requests_still_gets_everything,
    recipients_the_endpoint_fails_are_retried_or_recorded,
    kill_9_mid_run_then_restart_loses_nothing,
    queued_batches_are_sent_with_the_dynamic_params_live_at_send_time,
    batches_written_at_intake_are_sent_with_the_dynamic_params_live_at_send_time,
    delivered_dispatches_are_forgotten_after_the_retention_and_dead_ones_kept,
    an_idempotent_retrigger_queues_nothing,
    pause_holds_work_resume_sends_it_and_a_deleted_touchpoint_parks_it,
    dead_letters_are_listed_and_replayed,
    retry_after_is_honoured,
    sigterm_drains_in_flight_deliveries,
    the_dispatch_command_streams_a_users_file_and_waits
);

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// A project with one custom touchpoint `sms` pointing at `sink`, applied.
fn project(sink: &Sink, batch_size: u32, extra: &str) -> Project {
    project_on(Backend::Sqlite, sink, batch_size, extra)
}

/// [`project`] with its registry and queue on `backend`.
fn project_on(backend: Backend, sink: &Sink, batch_size: u32, extra: &str) -> Project {
    let p = Project::empty_on(backend);
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, batch_size, extra),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    p
}

fn open_daemon(p: &Project, more: &[&str]) -> Daemon {
    let mut args = vec!["--insecure-no-auth", "--allow-private-network"];
    args.extend_from_slice(more);
    p.start_daemon(&args, &ENV)
}

fn trigger(n: usize) -> Value {
    json!({
        "touchpoint": "sms",
        "campaign": "spring-sale",
        "template_params": {"text": "【品牌】会员日满100减20"},
        "users": users(n),
    })
}

fn ids(recipients: &[Value]) -> Vec<String> {
    recipients
        .iter()
        .map(|r| r["user_id"].as_str().unwrap().to_string())
        .collect()
}

/// The sink received `n` recipients, each user once.
fn assert_each_user_once(sink: &Sink, n: usize) {
    let delivered = ids(&sink.delivered());
    let unique: BTreeSet<&String> = delivered.iter().collect();
    assert_eq!((delivered.len(), unique.len()), (n, n));
}

/// Runs `refused`, a command that refuses its users file, and checks that nothing more reached
/// the daemon or the sink: no trigger was answered meanwhile, nothing is pending, and the sink
/// still has the `n` recipients it had.
fn assert_nothing_more_sent(d: &Daemon, sink: &Sink, n: usize, refused: impl FnOnce()) {
    let requests = d.metric("touchctl_dispatch_requests_total");
    refused();
    assert_eq!(
        d.metric("touchctl_dispatch_requests_total"),
        requests,
        "a trigger reached the daemon"
    );
    // A batch is pending until its answer is recorded, and the sink records a request before it
    // answers: with nothing pending, whatever was sent is in the sink.
    let (_, status) = d.call("GET", "/v1/status", None);
    assert_eq!(status["queue"]["pending_batches"], 0, "{status}");
    assert_eq!(sink.delivered().len(), n);
}

fn ten_thousand_users_arrive_as_batches_of_batch_size_with_their_params(b: Backend) {
    let sink = Sink::ok();
    let p = project_on(b, &sink, 500, "");
    let d = open_daemon(&p, &[]);
    let mut t = trigger(10_000);
    t["users"]
        .as_array_mut()
        .unwrap()
        .push(json!({"user_id": "no-phone", "attributes": {"member_id": "m"}}));
    let (code, receipt) = d.dispatch(&t);
    assert_eq!(code, 202, "{receipt}");
    assert_eq!(receipt["accepted"], 10_000);
    assert_eq!(receipt["batches"], 20);
    assert_eq!(
        receipt["rejected"],
        json!([{"user_id": "no-phone", "reason": "missing attribute `phone` (dynamic param `phone`)"}])
    );
    let id = receipt["dispatch_id"].as_str().unwrap();
    let status = d.wait_finished(id);
    assert_eq!(status["delivered"], 10_000, "{status}");
    assert_eq!(status["dead"], 0);

    let got = sink.received();
    assert_eq!(got.len(), 20);
    let mut indexes = BTreeSet::new();
    for r in &got {
        let recipients = r.body["recipients"].as_array().unwrap();
        assert_eq!(recipients.len(), 500);
        assert_eq!(r.body["type"], "touchpoint.dispatch");
        assert_eq!(r.body["touchpoint"], "sms");
        assert_eq!(r.body["campaign"], "spring-sale");
        assert_eq!(r.body["dispatch_id"], id);
        assert_eq!(r.body["batch"]["count"], 20);
        assert_eq!(
            r.body["template"],
            json!({"text": "【品牌】会员日满100减20"})
        );
        assert_eq!(r.headers["authorization"], "Bearer sink-token-value");
        assert_eq!(r.headers["content-type"], "application/json");
        let index = r.body["batch"]["index"].as_u64().unwrap();
        assert_eq!(r.headers["webhook-id"], format!("{id}_{index}"));
        assert!(r.headers["webhook-timestamp"].parse::<i64>().is_ok());
        assert!(
            !r.headers.contains_key("webhook-signature"),
            "no signing secret, no signature"
        );
        indexes.insert(index);
        for rec in recipients {
            let n: usize = rec["user_id"].as_str().unwrap()[1..].parse().unwrap();
            assert_eq!(
                rec,
                &json!({"user_id": format!("u{n}"), "member_id": format!("m{n}"), "phone": format!("138{n:08}")}),
                "dynamic params mapped, other attributes left out"
            );
        }
    }
    assert_eq!(indexes, (0..20).collect());
    let mut all = ids(&sink.delivered());
    all.sort();
    let want: BTreeSet<String> = (0..10_000).map(|i| format!("u{i}")).collect();
    assert_eq!(all.len(), 10_000, "each user exactly once");
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), want);

    let (_, metrics) = d.call("GET", "/metrics", None);
    // Series as a single daemon names them (a daemon sharing a queue adds its node).
    let text: String = metrics["raw"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| crate::daemon_support::without_node_label(l) + "\n")
        .collect();
    assert!(
        text.contains("touchctl_recipients_delivered_total{touchpoint=\"sms\"} 10000"),
        "{text}"
    );
    assert!(text.contains("touchctl_recipients_rejected_total{touchpoint=\"sms\"} 1"));
    // Twenty batches came from at least one claim that found some, and at most twenty.
    let found_some: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("touchctl_queue_claims_total{found=\"some\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no claims counted in {text}"));
    assert!((1..=20).contains(&found_some), "{text}");
}

/// Kills and reaps a child process when dropped, also when a test fails.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn signatures_verify_with_the_standard_webhooks_reference_library() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let p = Project::empty();
    let out = p.path().join("verified.ndjson");
    let mut py = ChildGuard(
        std::process::Command::new("python3")
            .arg(repo_root().join("tests/fixtures/sinks/verify_sink.py"))
            .arg(secret)
            .arg(&out)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (the reference library is Python's `standardwebhooks`)"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(py.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let Some(port) = line.trim().strip_prefix("PORT ") else {
        let _ = py.0.kill();
        let _ = py.0.wait();
        let mut said = String::new();
        let _ = std::io::Read::read_to_string(&mut py.0.stderr.take().unwrap(), &mut said);
        panic!(
            "the verifying sink did not start (pip install standardwebhooks; .ci/run does): {line}\n{said}"
        );
    };
    let url = format!("http://127.0.0.1:{port}");
    let signed = |id: &str, env: &str| {
        custom_touchpoint(
            id,
            &url,
            500,
            &format!("signing_secret = {{ env = \"{env}\" }}\n"),
        )
    };
    p.write("touchpoints/sms.toml", &signed("sms", "SINK_SIGNING"));
    p.write("touchpoints/other.toml", &signed("other", "OTHER_SIGNING"));
    let env = [
        ("SINK_TOKEN", "t"),
        ("SINK_SIGNING", secret),
        (
            "OTHER_SIGNING",
            "whsec_c29tZS1vdGhlci1rZXktdGhhdC1kb2VzLW5vdC1tYXRjaA==",
        ),
    ];
    p.run_env(&["apply", "--auto-approve"], &env).code(0);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &env);
    let (code, r) = d.dispatch(&trigger(1200));
    assert_eq!(code, 202, "{r}");
    let s = d.wait_finished(r["dispatch_id"].as_str().unwrap());
    assert_eq!(s["delivered"], 1200, "{s}");
    // A touchpoint signing with another secret fails verification: the check is real.
    let mut t = trigger(3);
    t["touchpoint"] = "other".into();
    let (_, r2) = d.dispatch(&t);
    let s2 = d.wait_finished(r2["dispatch_id"].as_str().unwrap());
    assert_eq!(s2["dead"], 3, "{s2}");
    drop(py);
    let records: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verified: Vec<&Value> = records.iter().filter(|r| r["verified"] == true).collect();
    assert_eq!(verified.len(), 3, "{records:?}");
    assert_eq!(
        verified
            .iter()
            .map(|r| r["recipients"].as_u64().unwrap())
            .sum::<u64>(),
        1200
    );
    assert_eq!(
        records.len(),
        4,
        "one refused request, not retried (HTTP 400 is final)"
    );
}

fn a_sink_failing_half_its_requests_still_gets_everything(b: Backend) {
    let sink = Sink::new(Arc::new(|n, _| {
        if n % 2 == 0 {
            (
                500,
                Vec::new(),
                "{\"error\":\"flaky\"}".into(),
                Duration::ZERO,
            )
        } else {
            (200, Vec::new(), "{}".into(), Duration::ZERO)
        }
    }));
    let p = project_on(b, &sink, 100, "");
    let d = open_daemon(&p, &[]);
    let (code, r) = d.dispatch(&trigger(5_000));
    assert_eq!(code, 202);
    let s = d.wait_finished(r["dispatch_id"].as_str().unwrap());
    assert_eq!(s["delivered"], 5_000, "{s}");
    assert_eq!(s["dead"], 0);
    let delivered: BTreeSet<String> = ids(&sink.delivered()).into_iter().collect();
    assert_eq!(delivered.len(), 5_000);
    let failed = sink.received().iter().filter(|r| r.status == 500).count();
    assert!(failed >= 49, "about half the requests failed: {failed}");
    // Every retry of a batch carries the same webhook-id.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for r in sink.received() {
        *by_id.entry(r.headers["webhook-id"].clone()).or_default() += 1;
    }
    assert_eq!(by_id.len(), 50);
    let out = p.run(&["deliveries", "list", "--format", "json", "--limit", "0"]);
    out.code(0);
    let batches: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(batches.len(), 50);
    assert!(batches.iter().all(|b| b["state"] == "delivered"));
}

fn recipients_the_endpoint_fails_are_retried_or_recorded(b: Backend) {
    // Each first attempt: u0 of the batch is to be retried, u1 refused for good.
    let sink = Sink::new(Arc::new(|_, body: &Value| {
        let recipients = body["recipients"].as_array().cloned().unwrap_or_default();
        let first = recipients
            .first()
            .and_then(|r| r["user_id"].as_str())
            .unwrap_or_default()
            .to_string();
        if recipients.len() == 10 {
            let second = recipients[1]["user_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let answer = json!({"failed": [
                {"user_id": first, "reason": "gateway busy", "retry": true},
                {"user_id": second, "reason": "number on the blocklist", "retry": false},
                {"user_id": "someone-else", "reason": "not in this batch", "retry": false}
            ]});
            (200, Vec::new(), answer.to_string(), Duration::ZERO)
        } else {
            (200, Vec::new(), "{}".into(), Duration::ZERO)
        }
    }));
    let p = project_on(b, &sink, 10, "");
    let d = open_daemon(&p, &[]);
    let (_, r) = d.dispatch(&trigger(30));
    let s = d.wait_finished(r["dispatch_id"].as_str().unwrap());
    assert_eq!(
        (s["delivered"].as_u64(), s["failed"].as_u64()),
        (Some(27), Some(3)),
        "{s}"
    );
    let got = sink.received();
    assert_eq!(
        got.len(),
        6,
        "3 batches, then 3 retries of one recipient each"
    );
    assert!(
        got[3..]
            .iter()
            .all(|r| r.body["recipients"].as_array().unwrap().len() == 1)
    );
    let batch = format!("{}_0", r["dispatch_id"].as_str().unwrap());
    let show = p.run(&["deliveries", "show", &batch]);
    show.code(0)
        .stdout_has("1 recipient(s) to retry, as the endpoint asked")
        .stdout_has("→ partial")
        .stdout_has("u1: number on the blocklist")
        .stdout_has("recipients: 10 in all, 9 delivered, 1 failed, 0 remaining");
}

fn kill_9_mid_run_then_restart_loses_nothing(b: Backend) {
    let sink = Sink::new(Arc::new(|_, _| {
        (200, Vec::new(), "{}".into(), Duration::from_millis(40))
    }));
    let p = project_on(b, &sink, 50, "");
    let d = open_daemon(&p, &["--concurrency", "2"]);
    let (code, r) = d.dispatch(&trigger(3_000));
    assert_eq!(code, 202);
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    sink.wait_for("a few batches", |got| got.len() >= 6);
    d.kill9();
    let before = sink.received().len();
    assert!(
        before < 60,
        "killed mid-run: {before} of 60 batches arrived"
    );

    // A trigger accepted just before a kill is on disk too.
    let d = open_daemon(&p, &["--concurrency", "2"]);
    let mut late = trigger(100);
    late["campaign"] = "late".into();
    let (code, r2) = d.dispatch(&late);
    assert_eq!(code, 202);
    d.kill9();

    let d = open_daemon(&p, &["--concurrency", "8"]);
    let s = d.wait_finished(&id);
    assert_eq!(s["delivered"], 3_000, "{s}");
    let s2 = d.wait_finished(r2["dispatch_id"].as_str().unwrap());
    assert_eq!(s2["delivered"], 100);
    let delivered: BTreeSet<String> = ids(&sink.delivered()).into_iter().collect();
    assert_eq!(
        delivered.len(),
        3_000,
        "every accepted user arrived at least once"
    );
    let (code, _) = d.terminate();
    assert_eq!(code, 0);
}

#[test]
fn a_broken_file_does_not_take_a_live_touchpoint_down() {
    let sink = Sink::ok();
    let p = project(&sink, 500, "");
    let d = open_daemon(&p, &["--watch", "--interval", "1h"]);
    let good = p.read("touchpoints/sms.toml");
    p.write(
        "touchpoints/sms.toml",
        &good.replace("batch_size = 500", "batch_size = 0"),
    );
    let status = d.wait_until("/v1/status", "the broken file was never noticed", |_, s| {
        s["reconcile"]["ok"] == false
    });
    let diag = &status["reconcile"]["diagnostics"][0];
    assert_eq!(diag["code"], "out-of-range");
    assert!(diag["path"].as_str().unwrap().ends_with("sms.toml"));
    assert!(
        status["reconcile"]["error"]
            .as_str()
            .unwrap()
            .contains("the last good set keeps serving")
    );
    assert!(d.log().contains("error[out-of-range]"), "{}", d.log());
    // The live touchpoint still takes and delivers triggers, with its last good settings.
    let (code, r) = d.dispatch(&trigger(600));
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["batches"], 2);
    assert_eq!(
        d.wait_finished(r["dispatch_id"].as_str().unwrap())["delivered"],
        600
    );

    // Fixed with new settings: batches sent after the change use them, and say which generation.
    p.write(
        "touchpoints/sms.toml",
        &good.replace("batch_size = 500", "batch_size = 250"),
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        // The generation is what lasts; a later reconcile with nothing to do may follow at once.
        let (_, s) = d.call("GET", "/v1/status", None);
        let (_, tps) = d.call("GET", "/v1/touchpoints", None);
        if s["reconcile"]["ok"] == true && tps["touchpoints"][0]["generation"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the fix was never applied: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, tps) = d.call("GET", "/v1/touchpoints", None);
    let generation = tps["touchpoints"][0]["generation"].as_u64().unwrap();
    assert_eq!(generation, 2);
    let (_, r) = d.dispatch(&trigger(600));
    assert_eq!(r["batches"], 3);
    d.wait_finished(r["dispatch_id"].as_str().unwrap());
    let show = p.run(&[
        "deliveries",
        "show",
        &format!("{}_0", r["dispatch_id"].as_str().unwrap()),
        "--format",
        "json",
    ]);
    let doc: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(doc["attempts"][0]["generation"], 2);
}

/// Changes `sms`'s dynamic params (`phone` is sent as `mobile`, `tier` is added), applies the
/// change and waits until the daemon uses it (generation 2).
fn rename_phone_and_add_tier(p: &Project, d: &Daemon) {
    let changed = p.read("touchpoints/sms.toml").replace(
        "phone = \"user.phone\"",
        "mobile = \"user.phone\"\ntier = \"user.tier\"",
    );
    p.write("touchpoints/sms.toml", &changed);
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    d.wait_until("/v1/touchpoints", "the change was never seen", |_, tps| {
        tps["touchpoints"][0]["generation"] == 2
    });
}

fn queued_batches_are_sent_with_the_dynamic_params_live_at_send_time(b: Backend) {
    let sink = Sink::new(Arc::new(|_, _| {
        (503, Vec::new(), String::new(), Duration::ZERO)
    }));
    let p = project_on(b, &sink, 100, "");
    let d = open_daemon(&p, &[]);
    let (_, r) = d.dispatch(&trigger(200));
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    sink.wait_for("first attempts", |got| got.len() >= 2);
    assert!(
        sink.received()[0].body["recipients"][0]["phone"].is_string(),
        "queued under the first params"
    );
    // The params change while the batches wait: `phone` is now sent as `mobile`, and `tier` is
    // added.
    rename_phone_and_add_tier(&p, &d);
    sink.answer_with(Arc::new(|_, _| {
        (200, Vec::new(), "{}".into(), Duration::ZERO)
    }));
    assert_eq!(d.wait_finished(&id)["delivered"], 200);
    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 200);
    for r in &delivered {
        let n = &r["user_id"].as_str().unwrap()[1..];
        let n: usize = n.parse().unwrap();
        assert_eq!(
            r,
            &json!({"user_id": format!("u{n}"), "mobile": format!("138{n:08}"), "member_id": format!("m{n}"), "tier": "gold"}),
            "sent with the params live at send time"
        );
    }
}

fn batches_written_at_intake_are_sent_with_the_dynamic_params_live_at_send_time(b: Backend) {
    // The daemon writes each batch's recipients when it accepts the trigger and keeps them in
    // memory. Here the first request is held until the params change, so the batches behind it
    // (one at a time) go out after the change and must be written anew.
    let arrivals = Arrivals::default();
    let gate = Arc::new(AtomicBool::new(false));
    let sink = Sink::new(arrivals.counting(holding_the_first(gate.clone())));
    let p = project_on(b, &sink, 100, "");
    let d = open_daemon(&p, &["--concurrency", "1"]);
    let (_, r) = d.dispatch(&trigger(300));
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    arrivals.wait_for(1, "the first batch was never sent");
    rename_phone_and_add_tier(&p, &d);
    gate.store(true, Ordering::SeqCst);
    assert_eq!(d.wait_finished(&id)["delivered"], 300);
    let got = sink.received();
    assert_eq!(got.len(), 3, "one request per batch");
    for r in &got {
        let old = r.body["batch"]["index"] == 0;
        for recipient in r.body["recipients"].as_array().unwrap() {
            let n: usize = recipient["user_id"].as_str().unwrap()[1..].parse().unwrap();
            let expected = if old {
                json!({"user_id": format!("u{n}"), "phone": format!("138{n:08}"), "member_id": format!("m{n}")})
            } else {
                json!({"user_id": format!("u{n}"), "mobile": format!("138{n:08}"), "member_id": format!("m{n}"), "tier": "gold"})
            };
            assert_eq!(recipient, &expected, "batch {}", r.body["batch"]);
        }
    }
}

fn delivered_dispatches_are_forgotten_after_the_retention_and_dead_ones_kept(b: Backend) {
    let sink = Sink::new(Arc::new(|_, body: &Value| {
        if body["campaign"] == "doomed" {
            (400, Vec::new(), "no such campaign".into(), Duration::ZERO)
        } else {
            (200, Vec::new(), "{}".into(), Duration::ZERO)
        }
    }));
    let p = project_on(b, &sink, 100, "");
    let d = open_daemon(&p, &["--retention", "1s"]);
    let mut delivered = trigger(150);
    delivered["idempotency_key"] = json!("spring-1");
    let (code, r) = d.dispatch(&delivered);
    assert_eq!(code, 202, "{r}");
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    let mut doomed = trigger(10);
    doomed["campaign"] = json!("doomed");
    let (_, r) = d.dispatch(&doomed);
    let dead_id = r["dispatch_id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_finished(&id)["delivered"], 150);
    assert_eq!(d.wait_finished(&dead_id)["dead"], 10);
    d.wait_until(
        &format!("/v1/dispatches/{id}"),
        "the delivered dispatch was never forgotten",
        |code, _| code == 404,
    );
    assert!(
        d.log()
            .contains("forgot 1 fully delivered dispatch(es) older than 1s"),
        "{}",
        d.log()
    );
    // The dead letter stays, to be seen and replayed, however old.
    let (code, s) = d.call("GET", &format!("/v1/dispatches/{dead_id}"), None);
    assert_eq!((code, &s["dead"]), (200, &json!(10)), "{s}");
    // The idempotency key went with its dispatch: the same trigger is a new dispatch now.
    let (code, again) = d.dispatch(&delivered);
    assert_eq!(code, 202);
    assert_ne!(again["dispatch_id"], json!(id));
}

#[test]
fn a_git_source_reconciles_only_committed_content() {
    let sink = Sink::ok();
    let p = Project::empty();
    p.write(
        "touchpoints/sms.toml",
        &custom_touchpoint("sms", &sink.url, 500, ""),
    );
    let first = p.git_init();
    let d = open_daemon(&p, &["--watch", "--source", "git:main", "--interval", "1h"]);
    let (_, s) = d.call("GET", "/v1/status", None);
    assert_eq!(s["reconcile"]["commit"], first.as_str(), "{s}");
    assert_eq!(s["touchpoints"]["live"], 1);
    // An uncommitted file changes nothing, even when a later commit is reconciled; committing
    // it does.
    p.write(
        "touchpoints/points.toml",
        &custom_touchpoint("points", &sink.url, 100, ""),
    );
    p.set(
        "touchpoints/sms.toml",
        "batch_size = 500",
        "batch_size = 400",
    );
    p.git(&["commit", "-q", "-m", "sms", "--", "touchpoints/sms.toml"]);
    let only_sms = p.git(&["rev-parse", "HEAD"]);
    d.wait_until("/v1/status", "the commit was never reconciled", |_, s| {
        s["reconcile"]["commit"] == only_sms.as_str()
    });
    // The registry is written before the reconcile's report: it shows what that reconcile did.
    let ids: Vec<String> = p.query_all("SELECT id FROM touchpoints ORDER BY id");
    assert_eq!(ids, ["sms"], "only committed content goes live");
    let generation: i64 = p.query_one("SELECT generation FROM touchpoints WHERE id = 'sms'");
    assert_eq!(generation, 2, "the committed change went live");
    let second = p.commit_all("points");
    let s = d.wait_until("/v1/status", "the commit was never reconciled", |_, s| {
        s["touchpoints"]["live"] == 2
    });
    assert_eq!(s["reconcile"]["commit"], second.as_str());
    let commit: String = p.query_one("SELECT source_commit FROM touchpoints WHERE id = 'points'");
    assert_eq!(commit, second);
}

fn an_idempotent_retrigger_queues_nothing(b: Backend) {
    let sink = Sink::ok();
    let p = project_on(b, &sink, 500, "");
    let d = open_daemon(&p, &[]);
    let mut t = trigger(700);
    t["idempotency_key"] = "spring-sale-2026-11-22".into();
    let (code, first) = d.dispatch(&t);
    assert_eq!(code, 202);
    d.wait_finished(first["dispatch_id"].as_str().unwrap());
    let (code, again) = d.dispatch(&t);
    assert_eq!(code, 202);
    assert_eq!(again, first, "the first answer, again");
    // The answer comes once the work is stored: nothing new is on record, nothing is pending,
    // and (a batch being pending until the sink has it) the sink has only the first two.
    let out = p.run(&["deliveries", "list", "--format", "json", "--limit", "0"]);
    out.code(0);
    let batches: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(batches.len(), 2, "nothing was queued the second time");
    assert_eq!(
        d.metric("touchctl_recipients_accepted_total{touchpoint=\"sms\"}"),
        700
    );
    let (_, status) = d.call("GET", "/v1/status", None);
    assert_eq!(status["queue"]["pending_batches"], 0);
    assert_eq!(sink.received().len(), 2, "nothing was sent the second time");
    t["campaign"] = "another".into();
    let (code, e) = d.dispatch(&t);
    assert_eq!(code, 409);
    assert_eq!(e["error"]["code"], "idempotency_key_reused");
}

#[test]
fn a_burst_of_triggers_with_errors_among_them_is_answered_in_full() {
    // Triggers are worked on a few at a time (one per core) and the rest wait their turn: a burst
    // far larger than that, a third of it refused for different reasons, must get every answer,
    // and every accepted user must arrive once.
    let sink = Sink::ok();
    let p = project(&sink, 50, "");
    let d = Arc::new(open_daemon(&p, &[]));
    let (tx, rx) = std::sync::mpsc::channel();
    let burst = 60;
    for i in 0..burst {
        let (d, tx) = (d.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut t = trigger(120);
            t["campaign"] = format!("burst-{i}").into();
            let body = match i % 3 {
                0 => b"{\"touchpoint\": \"sms\", \"users\": [".to_vec(),
                1 => {
                    t["template_params"]["text"] = "x".repeat(71).into();
                    serde_json::to_vec(&t).unwrap()
                }
                _ => serde_json::to_vec(&t).unwrap(),
            };
            let _ = tx.send((
                i,
                d.call("POST", "/v1/dispatch", Some(("application/json", body))),
            ));
        });
    }
    drop(tx);
    let deadline = Instant::now() + PATIENCE;
    let mut accepted = Vec::new();
    for _ in 0..burst {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, (code, body)) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("not every trigger was answered\n{}", d.log()));
        let want = [400, 422, 202][i % 3];
        assert_eq!(code, want, "trigger {i}: {body}");
        if code == 202 {
            accepted.push(body["dispatch_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(accepted.len(), burst / 3);
    for id in &accepted {
        let status = d.wait_finished(id);
        assert_eq!(status["delivered"], 120, "{status}");
    }
    let delivered = sink.received();
    assert_eq!(
        delivered.len(),
        accepted.len() * 3,
        "120 users in batches of 50: three requests each"
    );
    let mut per_dispatch: HashMap<String, usize> = HashMap::new();
    for r in &delivered {
        *per_dispatch
            .entry(r.body["dispatch_id"].as_str().unwrap().to_string())
            .or_default() += r.body["recipients"].as_array().unwrap().len();
    }
    assert_eq!(per_dispatch.len(), accepted.len());
    assert!(per_dispatch.values().all(|&n| n == 120), "{per_dispatch:?}");
    let (_, metrics) = d.call("GET", "/metrics", None);
    let text = metrics["raw"].as_str().unwrap();
    assert!(
        text.contains("\ntouchctl_intake_waiting 0\n"),
        "nothing left waiting for the intake: {text}"
    );
}

#[test]
fn api_errors_say_what_is_wrong() {
    let sink = Sink::ok();
    let p = project(&sink, 500, "");
    let env = [
        ("SINK_TOKEN", "sink-token-value"),
        ("TOUCHCTL_API_TOKEN", "api-secret-token-0123456789abcdef"),
    ];
    let d = p.start_daemon(
        &[
            "--allow-private-network",
            "--max-body",
            "200000",
            "--max-queued",
            "1000",
        ],
        &env,
    );
    let post = |token: Option<&str>, ct: &str, body: Vec<u8>| {
        http(
            "POST",
            &format!("{}/v1/dispatch", d.url),
            token,
            Some((ct, body)),
        )
    };
    let json_body = |v: &Value| serde_json::to_vec(v).unwrap();
    let tok = Some("api-secret-token-0123456789abcdef");
    let (code, e) = post(None, "application/json", json_body(&trigger(1)));
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, _) = post(Some("wrong"), "application/json", json_body(&trigger(1)));
    assert_eq!(code, 401);
    let (code, e) = post(tok, "application/json", b"{\"touchpoint\": ".to_vec());
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (400, Some("malformed"))
    );
    let mut t = trigger(1);
    t["touchpoint"] = "smss".into();
    let (code, e) = post(tok, "application/json", json_body(&t));
    assert_eq!(code, 404);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `sms`?"),
        "{e}"
    );
    let mut t = trigger(1);
    t["template_params"] = json!({"txt": "x".repeat(80)});
    let (code, e) = post(tok, "application/json", json_body(&t));
    assert_eq!(code, 422);
    assert_eq!(
        e["error"]["problems"],
        json!([
            "template param `text` is required",
            "`txt` is not a template param of this touchpoint; did you mean `text`?"
        ])
    );
    let mut t = trigger(1);
    t["template_params"] = json!({"text": "长".repeat(71)});
    let (code, e) = post(tok, "application/json", json_body(&t));
    assert_eq!(code, 422);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("71 characters long; it takes at most 70")
    );
    let (code, e) = post(tok, "application/json", json_body(&trigger(3000)));
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
    let (code, e) = post(tok, "text/csv", b"a,b".to_vec());
    assert_eq!(code, 415, "{e}");
    let ndjson = b"{\"touchpoint\":\"sms\",\"campaign\":\"c\",\"template_params\":{\"text\":\"hi\"}}\n{\"user_id\":\"u1\",\"attributes\":{\"phone\":\"1\",\"member_id\":\"m\"}}\nnot json\n".to_vec();
    let (code, e) = post(tok, "application/x-ndjson", ndjson);
    assert_eq!(code, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 3: not a user"),
        "{e}"
    );
    // A full queue answers 503 with Retry-After.
    sink.answer_with(Arc::new(|_, _| {
        (503, Vec::new(), String::new(), Duration::ZERO)
    }));
    let (code, _) = post(tok, "application/json", json_body(&trigger(900)));
    assert_eq!(code, 202);
    let (code, e) = post(tok, "application/json", json_body(&trigger(200)));
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (503, Some("queue_full"))
    );
    // Paused: 409.
    let (code, _) = http(
        "POST",
        &format!("{}/v1/touchpoints/sms/pause", d.url),
        tok,
        None,
    );
    assert_eq!(code, 200);
    let (code, e) = post(tok, "application/json", json_body(&trigger(1)));
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (409, Some("touchpoint_paused"))
    );
    let (code, e) = http("GET", &format!("{}/v1/nothing", d.url), tok, None);
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // The token never appears in the log.
    assert!(!d.log().contains("api-secret-token-0123456789abcdef"));
    assert!(!d.log().contains("sink-token-value"));
}

fn pause_holds_work_resume_sends_it_and_a_deleted_touchpoint_parks_it(b: Backend) {
    // The sender sends one request at a time, oldest due first. Its first request (to `points`)
    // is held at the sink until `gate` opens: meanwhile `sms` gets work and is paused with none
    // of it in flight. A later trigger to `points` then goes out only after whatever `sms` batch
    // the sender would send.
    let arrivals = Arrivals::default();
    let gate = Arc::new(AtomicBool::new(false));
    let sink = Sink::new(arrivals.counting(holding_the_first(gate.clone())));
    let p = project_on(b, &sink, 100, "");
    p.write(
        "touchpoints/points.toml",
        &custom_touchpoint("points", &sink.url, 100, ""),
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = open_daemon(&p, &["--max-in-flight", "1"]);
    let mut to_points = trigger(5);
    to_points["touchpoint"] = "points".into();
    let (code, r) = d.dispatch(&to_points);
    assert_eq!(code, 202, "{r}");
    arrivals.wait_for(1, "the first batch was never sent");
    let (code, r) = d.dispatch(&trigger(300));
    assert_eq!(code, 202, "{r}");
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    let (code, tp) = d.call("POST", "/v1/touchpoints/sms/pause", None);
    assert_eq!(code, 200);
    assert_eq!(tp["paused"], true);
    d.wait_until(
        &format!("/v1/dispatches/{id}"),
        "the batches were never held",
        |_, s| s["batches"]["held"] == 3,
    );
    let (code, later) = d.dispatch(&to_points);
    assert_eq!(code, 202, "{later}");
    gate.store(true, Ordering::SeqCst);
    assert_eq!(
        d.wait_finished(later["dispatch_id"].as_str().unwrap())["delivered"],
        5
    );
    let sent: Vec<Value> = sink
        .received()
        .iter()
        .map(|r| r.body["touchpoint"].clone())
        .collect();
    assert_eq!(sent, ["points", "points"], "held work is not sent");
    p.run_env(&["plan"], &ENV)
        .stdout_has("sms (custom): paused through the admin API");
    d.call("POST", "/v1/touchpoints/sms/resume", None);
    assert_eq!(d.wait_finished(&id)["delivered"], 300);

    // Deleted with work pending: parked and visible, not dropped; back when it is live again.
    sink.answer_with(Arc::new(|_, _| {
        (503, Vec::new(), String::new(), Duration::ZERO)
    }));
    let (_, r) = d.dispatch(&trigger(100));
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    let file = p.read("touchpoints/sms.toml");
    p.remove("touchpoints/sms.toml");
    p.run_env(&["apply", "--auto-approve", "--allow-delete"], &ENV)
        .code(0);
    d.wait_until(
        "/v1/touchpoints",
        "the parked work is not visible",
        |_, tps| tps["gone_with_pending_work"][0]["held_batches"] == 1,
    );
    let listed = p.run(&["deliveries", "list", "--status", "pending"]);
    listed.stdout_has("held: the touchpoint is no longer in the registry");
    sink.answer_with(Arc::new(|_, _| {
        (200, Vec::new(), "{}".into(), Duration::ZERO)
    }));
    p.write("touchpoints/sms.toml", &file);
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    assert_eq!(d.wait_finished(&id)["delivered"], 100);
}

fn dead_letters_are_listed_and_replayed(b: Backend) {
    let sink = Sink::new(Arc::new(|_, _| {
        (
            400,
            Vec::new(),
            "{\"error\":\"unknown template\"}".into(),
            Duration::ZERO,
        )
    }));
    let p = project_on(b, &sink, 100, "");
    let d = open_daemon(&p, &[]);
    let (_, r) = d.dispatch(&trigger(150));
    let id = r["dispatch_id"].as_str().unwrap().to_string();
    let s = d.wait_finished(&id);
    assert_eq!(s["dead"], 150, "HTTP 400 is final: dead at once");
    assert_eq!(sink.received().len(), 2);
    p.run(&["deliveries", "list", "--status", "dead"])
        .code(0)
        .stdout_has(&format!("{id}_0"))
        .stdout_has("HTTP 400: {\"error\":\"unknown template\"}");
    p.run(&["deliveries", "show", &format!("{id}_1")])
        .code(0)
        .stdout_has("HTTP 400")
        .stdout_has("→ dead")
        .stdout_has("50 remaining");
    sink.answer_with(Arc::new(|_, _| {
        (200, Vec::new(), "{}".into(), Duration::ZERO)
    }));
    p.run(&["deliveries", "replay", "--all"])
        .code(0)
        .stdout_has("2 batch(es) back in the queue.");
    let s = d.wait_finished(&id);
    assert_eq!(
        (s["delivered"].as_u64(), s["dead"].as_u64()),
        (Some(150), Some(0)),
        "{s}"
    );
    p.run(&["deliveries", "replay", "nope"])
        .code(1)
        .stderr_has("not dead (or unknown)");
}

fn retry_after_is_honoured(b: Backend) {
    let sink = Sink::new(Arc::new(|n, _| {
        if n == 0 {
            (
                429,
                vec![("retry-after", "2".to_string())],
                String::new(),
                Duration::ZERO,
            )
        } else {
            (200, Vec::new(), "{}".into(), Duration::ZERO)
        }
    }));
    let p = project_on(b, &sink, 100, "");
    // A Retry-After is honoured up to `max_backoff`: let it be longer than the 2s asked for.
    p.set(
        "touchpoints/sms.toml",
        "max_backoff = \"200ms\"",
        "max_backoff = \"5s\"",
    );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = open_daemon(&p, &[]);
    let (_, r) = d.dispatch(&trigger(10));
    d.wait_finished(r["dispatch_id"].as_str().unwrap());
    let got = sink.received();
    assert_eq!(got.len(), 2);
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, not after Retry-After: 2"
    );
}

#[test]
fn private_addresses_are_refused_without_the_flag() {
    let sink = Sink::ok();
    let p = project(&sink, 100, "");
    let d = p.start_daemon(&["--insecure-no-auth"], &ENV);
    let (_, r) = d.dispatch(&trigger(5));
    let s = d.wait_finished(r["dispatch_id"].as_str().unwrap());
    assert_eq!(s["dead"], 5);
    assert!(sink.received().is_empty());
    p.run(&["deliveries", "list"]).stdout_has(
        "refused: 127.0.0.1 resolves to 127.0.0.1, a loopback, private or link-local address",
    );
}

#[test]
fn the_daemon_refuses_to_start_open_to_the_network() {
    let p = Project::empty();
    let run = p.run(&["daemon", "--listen", "127.0.0.1:0"]);
    run.code(1)
        .stderr_has("the API needs a token: set TOUCHCTL_API_TOKEN");
    let run = p.run(&["daemon", "--listen", "0.0.0.0:0", "--insecure-no-auth"]);
    run.code(1)
        .stderr_has("--insecure-no-auth is only allowed on a loopback address");
}

fn sigterm_drains_in_flight_deliveries(b: Backend) {
    let arrivals = Arrivals::default();
    let sink = Sink::new(arrivals.counting(Arc::new(|_, _| {
        (200, Vec::new(), "{}".into(), Duration::from_millis(1500))
    })));
    let p = project_on(b, &sink, 100, "");
    let d = open_daemon(&p, &[]);
    let (_, r) = d.dispatch(&trigger(100));
    // The request is in flight once the sink has it (it answers 1.5 s later).
    arrivals.wait_for(1, "the batch was never sent");
    let (code, log) = d.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopping: no new connections"));
    assert_eq!(sink.received().len(), 1, "the in-flight request finished");
    let out = p.run(&[
        "deliveries",
        "list",
        "--dispatch",
        r["dispatch_id"].as_str().unwrap(),
    ]);
    out.code(0).stdout_has(" delivered ");
}

fn the_dispatch_command_streams_a_users_file_and_waits(b: Backend) {
    let sink = Sink::ok();
    let p = project_on(b, &sink, 500, "");
    let d = open_daemon(&p, &[]);
    let lines: Vec<String> = users(1234).iter().map(|u| u.to_string()).collect();
    p.write("users.ndjson", &(lines.join("\n") + "\n"));
    let run = p.run(&[
        "dispatch",
        "--url",
        &d.url,
        "--touchpoint",
        "sms",
        "--campaign",
        "c",
        "--users",
        "users.ndjson",
        "--param",
        "text=会员日",
        "--wait",
    ]);
    run.code(0)
        .stdout_has("\"accepted\": 1234")
        .stderr_has("1234 delivered, 0 failed, 0 pending, 0 dead");
    assert_eq!(sink.delivered().len(), 1234);
    let run = p.run(&[
        "dispatch",
        "--url",
        &d.url,
        "--touchpoint",
        "sms",
        "--campaign",
        "c",
        "--users",
        "users.ndjson",
    ]);
    run.code(1)
        .stderr_has("422")
        .stderr_has("template param `text` is required");
}

#[test]
fn a_users_file_larger_than_a_trigger_is_sent_in_parts_and_a_rerun_sends_only_what_is_missing() {
    let sink = Sink::ok();
    let p = project(&sink, 100, "");
    // Part 2 of three (users 1000 to 1999) carries long notes: its body is over the first
    // daemon's --max-body, parts 1 and 3 are not.
    let mut lines: Vec<String> = users(2500)
        .into_iter()
        .enumerate()
        .map(|(i, mut u)| {
            if (1000..2000).contains(&i) {
                u["attributes"]["note"] = json!("备注".repeat(60));
            }
            u.to_string()
        })
        .collect();
    // A user id seen in an earlier part is sent once.
    lines.insert(2100, users(11)[10].to_string());
    p.write("users.ndjson", &(lines.join("\n") + "\n"));
    let args = [
        "dispatch",
        "--touchpoint",
        "sms",
        "--campaign",
        "big",
        "--users",
        "users.ndjson",
        "--param",
        "text=会员日",
        "--per-trigger",
        "1000",
        "--idempotency-key",
        "big-1",
        "--wait",
    ];
    let with_url = |url: &str| {
        let mut a = args.to_vec();
        a.extend(["--url", url]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |url: &str| {
        let a = with_url(url);
        p.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let d = open_daemon(&p, &["--max-body", "200000"]);
    let first = run(&d.url);
    first
        .code(1)
        .stderr_has("part 1 of 3: 1000 accepted, 0 rejected")
        .stderr_has("error: part 2 of 3 (1000 users): the daemon answered 413")
        .stderr_has("1 of 3 parts were accepted before that")
        .stderr_has("Run the same command again")
        .stdout_has("\"accepted\": 1000");
    sink.wait_for("part 1 delivered", |r| {
        r.iter()
            .filter_map(|b| b.body["recipients"].as_array())
            .map(Vec::len)
            .sum::<usize>()
            == 1000
    });
    d.terminate();

    // A daemon that takes larger bodies: the same command again sends parts 2 and 3 only.
    let d = open_daemon(&p, &[]);
    let again = run(&d.url);
    again
        .code(0)
        .stderr_has("part 1 of 3: 1000 accepted, 0 rejected (dsp_")
        .stderr_has("sent before: nothing new queued")
        .stderr_has("part 3 of 3: 500 accepted")
        .stderr_has("3 dispatches: 2500 delivered, 0 failed, 0 pending, 0 dead")
        .stdout_has("\"accepted\": 2500")
        .stdout_has("the same `user_id` appears earlier in the users file");
    assert_each_user_once(&sink, 2500);
    // Once more: everything answered from the daemon's record, nothing queued.
    run(&d.url)
        .code(0)
        .stderr_has("part 3 of 3: 500 accepted, 0 rejected (dsp_");
    // A file with a bad line is refused whole: no part of it is sent.
    lines.push("{\"user_id\": 7}".into());
    p.write("users.ndjson", &(lines.join("\n") + "\n"));
    assert_nothing_more_sent(&d, &sink, 2500, || {
        run(&d.url)
            .code(1)
            .stderr_has("users.ndjson line 2502: not a user");
    });
}

#[test]
fn a_users_file_as_a_json_array_is_sent_in_parts_too() {
    let sink = Sink::ok();
    let p = project(&sink, 100, "");
    let d = open_daemon(&p, &[]);
    let mut list = users(250);
    // A user id seen earlier in the array is sent once.
    list.push(list[3].clone());
    p.write("users.json", &serde_json::to_string_pretty(&list).unwrap());
    let run = |file: &str| {
        p.run(&[
            "dispatch",
            "--url",
            &d.url,
            "--touchpoint",
            "sms",
            "--campaign",
            "array",
            "--users",
            file,
            "--param",
            "text=会员日",
            "--per-trigger",
            "100",
            "--wait",
        ])
    };
    run("users.json")
        .code(0)
        .stderr_has("part 3 of 3: 50 accepted")
        .stderr_has("3 dispatches: 250 delivered, 0 failed, 0 pending, 0 dead")
        .stdout_has("\"accepted\": 250")
        .stdout_has("the same `user_id` appears earlier in the users file");
    assert_each_user_once(&sink, 250);
    // An array that does not parse is refused whole.
    p.write("broken.json", "[{\"user_id\": \"a\"},");
    assert_nothing_more_sent(&d, &sink, 250, || {
        run("broken.json")
            .code(1)
            .stderr_has("broken.json is not a JSON array of users");
    });
}

#[test]
fn slow_clients_are_cut_off() {
    use std::io::{Read, Write};
    let sink = Sink::ok();
    let p = project(&sink, 100, "");
    let d = open_daemon(&p, &["--client-timeout", "1s"]);
    let addr = d.url.trim_start_matches("http://").to_string();
    // Headers that never finish: the connection is closed.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"POST /v1/dispatch HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "the connection stayed open {waited:?}"
    );
    // A body that never finishes: 408, with a JSON reason.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(
        b"POST /v1/dispatch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"touchpoint\":",
    )
    .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 1s"), "{answer}");
    // The daemon still serves others.
    let (code, _) = d.call("GET", "/v1/status", None);
    assert_eq!(code, 200);
}

/// `examples/local/sink.py`, a minimal endpoint of your own to start from, receives and verifies what
/// the daemon sends.
#[test]
fn the_example_sink_verifies_the_daemons_signatures() {
    let p = Project::with_samples();
    let mut sink = ChildGuard(
        std::process::Command::new("python3")
            .arg(repo_root().join("examples/local/sink.py"))
            .args([
                "--port",
                "0",
                "--secret-file",
                "secrets/sandbox/sms_signing_secret",
            ])
            .current_dir(p.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(sink.0.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let url = first
        .strip_prefix("sink listening on ")
        .expect("the sink's address")
        .to_string();
    let sms = p.read("touchpoints/custom/sms.toml").replace(
        "http://127.0.0.1:8641/_sandbox/webhooks/sms",
        &format!("{url}/_sandbox/webhooks/sms"),
    );
    p.write("touchpoints/custom/sms.toml", &sms);
    p.run(&["apply", "--auto-approve"]).code(0);
    let d = open_daemon(&p, &[]);
    let users = std::fs::read_to_string(repo_root().join("examples/local/users.ndjson")).unwrap();
    p.write("users.ndjson", &users);
    p.run(&[
        "dispatch",
        "--url",
        &d.url,
        "--touchpoint",
        "sms",
        "--campaign",
        "member-day",
        "--users",
        "users.ndjson",
        "--param",
        "text=【品牌】会员日满100减20",
        "--wait",
    ])
    .code(0)
    .stdout_has("\"accepted\": 4");
    let line = lines.next().unwrap().unwrap();
    assert!(
        line.ends_with("sms batch 1/1: 4 recipient(s), signature verified"),
        "{line}"
    );
}
