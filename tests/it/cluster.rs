//! Several daemons on one PostgreSQL database: the real binary twice (or more), real sinks on
//! loopback, a real server (`TOUCHCTL_TEST_POSTGRES`). Each test gets a database of its own.
//!
//! What is checked: work is shared and every recipient is delivered in exactly one 2xx request;
//! a daemon killed with `kill -9` at a seeded random moment loses nothing acknowledged, and the
//! other takes its leased batches over once the lease expires; per-touchpoint concurrency and
//! `rate_limit` hold across the cluster; an idempotency key is taken once across the cluster;
//! a pause through one daemon reaches the other within a second; `/v1/status` lists the nodes and
//! `/metrics` labels by node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::Backend;
use crate::daemon_support::{Daemon, serve_on_loopback};
use crate::support::Project;

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// How long the big runs may take (debug builds on a small machine).
const LONG_PATIENCE: Duration = Duration::from_secs(300);

/// One request a [`Recorder`] answered.
#[derive(Clone, Debug)]
struct Request {
    /// The path's last part: the touchpoint.
    touchpoint: String,
    webhook_id: String,
    users: Vec<String>,
    status: u16,
    arrived: Instant,
}

/// A sink for every touchpoint of a test (`/hook/<touchpoint>`): records each request, answers
/// after `delay`, and keeps the most requests it had in flight at once per touchpoint.
struct Recorder {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    peak: Arc<Mutex<HashMap<String, usize>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Recorder {
    fn new(delay: Duration) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let peak = Arc::new(Mutex::new(HashMap::new()));
        let in_flight: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (rec, pk) = (requests.clone(), peak.clone());
        let app = axum::Router::new().route(
            "/hook/{tp}",
            axum::routing::post(
                move |axum::extract::Path(tp): axum::extract::Path<String>,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Bytes| {
                    let (rec, pk, in_flight) = (rec.clone(), pk.clone(), in_flight.clone());
                    async move {
                        let arrived = Instant::now();
                        {
                            let mut f = in_flight.lock().unwrap();
                            let n = f.entry(tp.clone()).or_insert(0);
                            *n += 1;
                            let mut p = pk.lock().unwrap();
                            let top = p.entry(tp.clone()).or_insert(0);
                            *top = (*top).max(*n);
                        }
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let users = body["recipients"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .map(|r| r["user_id"].as_str().unwrap_or_default().to_string())
                                    .collect()
                            })
                            .unwrap_or_default();
                        rec.lock().unwrap().push(Request {
                            touchpoint: tp.clone(),
                            webhook_id: headers
                                .get("webhook-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string(),
                            users,
                            status: 200,
                            arrived,
                        });
                        *in_flight.lock().unwrap().entry(tp).or_insert(1) -= 1;
                        "{}"
                    }
                },
            ),
        );
        let (url, stop) = serve_on_loopback(app);
        Self {
            url,
            requests,
            peak,
            _stop: stop,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn peak(&self, touchpoint: &str) -> usize {
        self.peak
            .lock()
            .unwrap()
            .get(touchpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Each user delivered (in a 2xx request), with the webhook ids of the requests that carried it.
    fn deliveries(&self) -> HashMap<String, Vec<String>> {
        let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
        for r in self.requests() {
            if (200..300).contains(&r.status) {
                for u in r.users {
                    by_user.entry(u).or_default().push(r.webhook_id.clone());
                }
            }
        }
        by_user
    }

    /// Waits until every user of `expected` was delivered, for at most `patience`.
    fn wait_for_all(&self, expected: &HashSet<String>, patience: Duration, daemons: &[&Daemon]) {
        let deadline = Instant::now() + patience;
        loop {
            let delivered = self.deliveries();
            let missing = expected
                .iter()
                .filter(|u| !delivered.contains_key(*u))
                .count();
            if missing == 0 {
                return;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
                panic!(
                    "{missing} of {} users were never delivered; logs:\n{}",
                    expected.len(),
                    logs.join("\n---\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A touchpoint file for the recorder.
fn touchpoint(id: &str, url: &str, batch_size: u32, extra: &str) -> String {
    format!(
        "id = \"{id}\"\nname = \"{id}\"\nkind = \"custom\"\ncategory = \"notification\"\nurl = \"{url}/hook/{id}\"\nallow_insecure = true\nauth_token = {{ env = \"SINK_TOKEN\" }}\nbatch_size = {batch_size}\n{extra}\n[retry]\nattempts = 20\nbackoff = \"20ms\"\nmax_backoff = \"200ms\"\n\n[dynamic_params]\nphone = \"user.phone\"\n\n[[template_params]]\nname = \"text\"\ntype = \"string\"\nmax_length = 70\n"
    )
}

/// A project on its own PostgreSQL database with the touchpoints `(id, batch size, extra)`,
/// applied; `None` when no test server is configured (the test is skipped).
fn cluster_project(
    test: &str,
    sink: &Recorder,
    touchpoints: &[(&str, u32, &str)],
) -> Option<Project> {
    if !Backend::Postgres.available(test) {
        return None;
    }
    let p = Project::empty_on(Backend::Postgres);
    for (id, size, extra) in touchpoints {
        p.write(
            &format!("touchpoints/{id}.toml"),
            &touchpoint(id, &sink.url, *size, extra),
        );
    }
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    Some(p)
}

fn start(p: &Project, more: &[&str]) -> Daemon {
    let mut args = vec!["--insecure-no-auth", "--allow-private-network"];
    args.extend_from_slice(more);
    p.start_daemon(&args, &ENV)
}

/// A small seeded generator (xorshift), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A trigger of `users` to `touchpoint`, with an idempotency key.
fn trigger(touchpoint: &str, users: &[String], key: &str) -> Value {
    json!({
        "touchpoint": touchpoint,
        "campaign": "cluster",
        "idempotency_key": key,
        "template_params": {"text": "hi"},
        "users": users
            .iter()
            .map(|u| json!({"user_id": u, "attributes": {"phone": "13800000000"}}))
            .collect::<Vec<_>>(),
    })
}

/// The node id a daemon reports.
fn node_of(d: &Daemon) -> String {
    let (code, status) = d.call("GET", "/v1/status", None);
    assert_eq!(code, 200, "{status}");
    status["node"]
        .as_str()
        .unwrap_or_else(|| panic!("no node in {status}"))
        .to_string()
}

#[test]
fn two_daemons_deliver_100000_recipients_each_in_exactly_one_2xx_request() {
    let sink = Recorder::new(Duration::ZERO);
    let Some(p) = cluster_project(
        "cluster::two_daemons_deliver_100000_recipients",
        &sink,
        &[("big", 500, ""), ("mid", 250, ""), ("odd", 97, "")],
    ) else {
        return;
    };
    let daemons = [start(&p, &[]), start(&p, &[])];
    // Mixed triggers, seeded: touchpoint, size and which daemon takes them vary; every tenth is
    // repeated to the other daemon with its idempotency key, which must queue nothing.
    let mut rng = Rng(0x5eed_0001);
    let mut plan = Vec::new();
    let mut next_user = 0usize;
    while next_user < 100_000 {
        let tp = ["big", "mid", "odd"][rng.below(3) as usize];
        let n = (1 + rng.below(6_000) as usize).min(100_000 - next_user);
        let users: Vec<String> = (next_user..next_user + n)
            .map(|i| format!("u{i}"))
            .collect();
        next_user += n;
        plan.push((tp, users, rng.below(2) as usize, plan.len() % 10 == 0));
    }
    let expected: HashSet<String> = (0..100_000).map(|i| format!("u{i}")).collect();
    let urls: Vec<String> = daemons.iter().map(|d| d.url.clone()).collect();
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..3 {
            let (plan, next, urls) = (plan.clone(), next.clone(), urls.clone());
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((tp, users, to, repeat)) = plan.get(i) else {
                        break;
                    };
                    let body = serde_json::to_vec(&trigger(tp, users, &format!("k{i}"))).unwrap();
                    let (code, first) = crate::daemon_support::http(
                        "POST",
                        &format!("{}/v1/dispatch", urls[*to]),
                        None,
                        Some(("application/json", body.clone())),
                    );
                    assert_eq!(code, 202, "{first}");
                    if *repeat {
                        let (code, again) = crate::daemon_support::http(
                            "POST",
                            &format!("{}/v1/dispatch", urls[1 - *to]),
                            None,
                            Some(("application/json", body)),
                        );
                        assert!(code == 200 || code == 202, "{code} {again}");
                        assert_eq!(again["dispatch_id"], first["dispatch_id"], "{again}");
                    }
                }
            });
        }
    });
    sink.wait_for_all(&expected, LONG_PATIENCE, &[&daemons[0], &daemons[1]]);
    // Nothing more comes once everything is recorded.
    let d0 = &daemons[0];
    d0.wait_until("/v1/status", "batches still pending", |_, s| {
        s["queue"]["pending_batches"] == 0
    });
    let delivered = sink.deliveries();
    let twice: Vec<(&String, &Vec<String>)> =
        delivered.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "{} users were in more than one 2xx request, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    assert_eq!(delivered.len(), 100_000);
    // Each request went to its touchpoint with at most its batch size.
    for r in sink.requests() {
        let max = match r.touchpoint.as_str() {
            "big" => 500,
            "mid" => 250,
            _ => 97,
        };
        assert!(
            r.users.len() <= max,
            "{} users to {}",
            r.users.len(),
            r.touchpoint
        );
    }
    // Both daemons did part of the sending.
    let senders: Vec<String> =
        p.query_all("SELECT DISTINCT node FROM attempts WHERE node IS NOT NULL ORDER BY node");
    let mut nodes = vec![node_of(&daemons[0]), node_of(&daemons[1])];
    nodes.sort();
    assert_eq!(senders, nodes, "both daemons send");
}

#[test]
fn a_daemon_killed_at_a_random_moment_loses_nothing_and_the_other_takes_its_batches_over() {
    // Seeded and repeated: each round starts two daemons on the same database, triggers to both,
    // kills one with SIGKILL at a moment the seed picks, and sends what it had not acknowledged
    // to the other (with the same idempotency key, as a client retrying would).
    let sink = Recorder::new(Duration::from_millis(15));
    let Some(p) = cluster_project(
        "cluster::a_daemon_killed_at_a_random_moment_loses_nothing",
        &sink,
        &[("sms", 200, "")],
    ) else {
        return;
    };
    let mut rng = Rng(0x0c1a_55ed);
    let mut acknowledged = HashSet::new();
    let mut taken_over = 0;
    for round in 0..3 {
        let victim = start(&p, &["--lease-ttl", "2s"]);
        let survivor = start(&p, &["--lease-ttl", "2s"]);
        let victim_node = node_of(&victim);
        let kill_after = Duration::from_millis(100 + rng.below(900));
        // Triggers go on until a few after the kill; their sizes are the seed's.
        let sizes: Vec<usize> = (0..300).map(|_| 400 + rng.below(800) as usize).collect();
        let users_of = |t: usize| -> Vec<String> {
            (0..sizes[t]).map(|i| format!("r{round}t{t}u{i}")).collect()
        };
        let killed = std::sync::atomic::AtomicBool::new(false);
        let victim_url = victim.url.clone();
        let acked = Mutex::new(Vec::new());
        let started = Instant::now();
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let mut after_kill = 0;
                for t in 0..sizes.len() {
                    if killed.load(Ordering::SeqCst) {
                        after_kill += 1;
                        if after_kill > 5 {
                            break;
                        }
                    }
                    let users = users_of(t);
                    let key = format!("r{round}k{t}");
                    let body = serde_json::to_vec(&trigger("sms", &users, &key)).unwrap();
                    let url = if t % 2 == 0 {
                        &victim_url
                    } else {
                        &survivor.url
                    };
                    let answered = send_quietly(url, &body);
                    let answered = answered.or_else(|| send_quietly(&survivor.url, &body));
                    let code = answered.expect("the survivor answers");
                    assert!(code == 200 || code == 202, "trigger {t}: HTTP {code}");
                    acked.lock().unwrap().extend(users);
                }
            });
            std::thread::sleep(kill_after.saturating_sub(started.elapsed()));
            // Killed at the first moment from then on at which it holds a batch (it sends one
            // at a time or more), so that there is something to take over.
            let deadline = Instant::now() + Duration::from_secs(30);
            while p.query_one::<i64>(&format!(
                "SELECT count(*) FROM batches WHERE lease_owner = '{victim_node}' AND state = 'pending'"
            )) == 0
            {
                assert!(Instant::now() < deadline, "the victim never claimed a batch");
                std::thread::sleep(Duration::from_millis(2));
            }
            // What the victim holds when it dies is the survivor's once the lease has run out.
            victim.kill9();
            killed.store(true, Ordering::SeqCst);
            let held: Vec<String> = p.query_all(&format!(
                "SELECT id FROM batches WHERE lease_owner = '{victim_node}' AND state = 'pending'"
            ));
            // (It may have recorded its last batch between the look and the kill: then this
            // round has nothing to take over, which the rounds together must not all be.)
            taken_over += held.len();
            sender.join().unwrap();
            let round_users: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
            sink.wait_for_all(&round_users, LONG_PATIENCE, &[&survivor]);
            // Every batch the victim held is finished by the survivor after the lease, even
            // one whose users the victim had sent before it died (it then comes again, under
            // the same webhook-id).
            let deadline = Instant::now() + LONG_PATIENCE;
            for id in &held {
                while p.query_one::<String>(&format!("SELECT state FROM batches WHERE id = '{id}'"))
                    == "pending"
                {
                    assert!(
                        Instant::now() < deadline,
                        "batch {id} was never taken over:\n{}",
                        survivor.log()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            for id in &held {
                let (state, owner): (String, String) = (
                    p.query_one(&format!("SELECT state FROM batches WHERE id = '{id}'")),
                    p.query_one(&format!(
                        "SELECT coalesce(lease_owner, '') FROM batches WHERE id = '{id}'"
                    )),
                );
                assert_eq!(
                    (state.as_str(), owner.as_str()),
                    ("delivered", ""),
                    "batch {id}"
                );
                let by: Vec<String> = p.query_all(&format!(
                    "SELECT node FROM attempts WHERE batch_id = '{id}' AND outcome = 'delivered'"
                ));
                assert_ne!(
                    by,
                    vec![victim_node.clone()],
                    "batch {id} finished by the survivor"
                );
            }
            acknowledged.extend(round_users);
        });
        survivor.terminate();
    }
    // Nothing acknowledged was lost; a user delivered twice was in one batch sent twice (the
    // victim died after sending, before recording), under one webhook-id.
    let delivered = sink.deliveries();
    for user in &acknowledged {
        let ids = delivered
            .get(user)
            .unwrap_or_else(|| panic!("{user} was acknowledged and never delivered"));
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{user} came in different batches: {ids:?}"
        );
    }
    eprintln!(
        "{} users acknowledged over 3 rounds; {taken_over} batch(es) held by a killed daemon were taken over",
        acknowledged.len()
    );
    assert!(taken_over > 0, "no round had a batch to take over");
}

/// Sends a trigger; `None` when the daemon cannot be reached (it was killed).
fn send_quietly(url: &str, body: &[u8]) -> Option<u16> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/v1/dispatch"))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    })
}

#[test]
fn concurrency_and_rate_limits_hold_across_the_cluster() {
    // Requests take 40 ms at the sink; each daemon may have 2 in flight per touchpoint: alone
    // they would have 4 at once, together they keep to 2. The rated touchpoint takes 10
    // requests a second (bursts of one second's worth): 40 requests need about 3 s however many
    // daemons send them.
    let sink = Recorder::new(Duration::from_millis(40));
    let Some(p) = cluster_project(
        "cluster::concurrency_and_rate_limits_hold_across_the_cluster",
        &sink,
        &[("slow", 10, ""), ("rated", 10, "rate_limit = \"10/s\"")],
    ) else {
        return;
    };
    let daemons = [
        start(&p, &["--concurrency", "2"]),
        start(&p, &["--concurrency", "2"]),
    ];
    for (i, tp) in ["slow", "rated"].iter().enumerate() {
        for k in 0..4 {
            let users: Vec<String> = (0..100).map(|u| format!("{tp}{k}u{u}")).collect();
            let (code, body) = daemons[k % 2].dispatch(&trigger(tp, &users, &format!("{i}-{k}")));
            assert_eq!(code, 202, "{body}");
        }
    }
    let expected: HashSet<String> = ["slow", "rated"]
        .iter()
        .flat_map(|tp| (0..4).flat_map(move |k| (0..100).map(move |u| format!("{tp}{k}u{u}"))))
        .collect();
    sink.wait_for_all(&expected, LONG_PATIENCE, &[&daemons[0], &daemons[1]]);
    assert!(
        sink.peak("slow") <= 2,
        "{} requests to `slow` at once",
        sink.peak("slow")
    );
    let rated: Vec<Instant> = sink
        .requests()
        .iter()
        .filter(|r| r.touchpoint == "rated")
        .map(|r| r.arrived)
        .collect();
    assert_eq!(rated.len(), 40);
    // At most a second's worth plus what refills in a second in any one-second window.
    let mut most = 0;
    for a in &rated {
        let within = rated
            .iter()
            .filter(|b| **b >= *a && **b < *a + Duration::from_secs(1))
            .count();
        most = most.max(within);
    }
    assert!(most <= 20, "{most} requests to `rated` within one second");
    // Which daemon sends is up to their claims: one that frees a place usually takes it again
    // first. Either way the other daemon was claiming all along (due batches were waiting), so
    // limits kept per daemon would have shown 3 or 4 at once above.
}

#[test]
fn an_idempotency_key_is_taken_once_across_the_cluster() {
    let sink = Recorder::new(Duration::ZERO);
    let Some(p) = cluster_project(
        "cluster::an_idempotency_key_is_taken_once_across_the_cluster",
        &sink,
        &[("sms", 100, "")],
    ) else {
        return;
    };
    let daemons = [start(&p, &[]), start(&p, &[])];
    let users: Vec<String> = (0..250).map(|u| format!("u{u}")).collect();
    let body = trigger("sms", &users, "spring-sale-once");
    // Sent to both at the same moment, several times over.
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let (d, body) = (&daemons[i % 2], &body);
                s.spawn(move || d.dispatch(body))
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let ids: HashSet<String> = answers
        .iter()
        .map(|(code, a)| {
            assert!(*code == 200 || *code == 202, "{code} {a}");
            a["dispatch_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    // Every answer is the first receipt; the users were accepted once, by one daemon.
    let accepted: u64 = daemons
        .iter()
        .map(|d| d.metric("touchctl_recipients_accepted_total"))
        .sum();
    assert_eq!(accepted, 250);
    let expected: HashSet<String> = users.iter().cloned().collect();
    sink.wait_for_all(&expected, LONG_PATIENCE, &[&daemons[0], &daemons[1]]);
    let count: i64 = p.query_one("SELECT count(*) FROM dispatches");
    assert_eq!(count, 1);
    // The same key for another campaign is refused by either daemon.
    let mut other = body.clone();
    other["campaign"] = json!("another");
    for d in &daemons {
        let (code, answer) = d.dispatch(&other);
        assert_eq!(code, 409, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("spring-sale-once"),
            "{answer}"
        );
    }
}

#[test]
fn a_pause_through_one_daemon_reaches_the_other_within_a_second() {
    let sink = Recorder::new(Duration::ZERO);
    let Some(p) = cluster_project(
        "cluster::a_pause_through_one_daemon_reaches_the_other",
        &sink,
        &[("sms", 100, "")],
    ) else {
        return;
    };
    let (a, b) = (start(&p, &[]), start(&p, &[]));
    let (code, body) = a.call("POST", "/v1/touchpoints/sms/pause", None);
    assert_eq!(code, 200, "{body}");
    let paused_at = Instant::now();
    // The other daemon refuses triggers for it once it knows.
    let users: Vec<String> = vec!["u1".into()];
    for attempt in 0.. {
        let (code, _) = b.dispatch(&trigger("sms", &users, &format!("after-pause-{attempt}")));
        if code == 409 {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(5),
            "the other daemon still accepts triggers 5 s after the pause:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = paused_at.elapsed();
    eprintln!("the pause reached the other daemon in {took:?}");
    // A second, with room for a busy machine's scheduling (the poll is every 250 ms).
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let (code, body) = a.call("POST", "/v1/touchpoints/sms/resume", None);
    assert_eq!(code, 200, "{body}");
    b.wait_until(
        "/v1/touchpoints/sms",
        "the resume never reached the other daemon",
        |_, t| t["paused"] == false,
    );
}

#[test]
fn status_lists_the_nodes_and_metrics_are_labelled_by_node() {
    let sink = Recorder::new(Duration::ZERO);
    let Some(p) = cluster_project(
        "cluster::status_lists_the_nodes_and_metrics_are_labelled_by_node",
        &sink,
        &[("sms", 100, "")],
    ) else {
        return;
    };
    let (a, b) = (start(&p, &[]), start(&p, &[]));
    let (na, nb) = (node_of(&a), node_of(&b));
    assert_ne!(na, nb);
    let (_, status) = a.call("GET", "/v1/status", None);
    let listed: BTreeMap<String, Value> = status["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {status}"))
        .iter()
        .map(|n| (n["node"].as_str().unwrap().to_string(), n.clone()))
        .collect();
    for (node, d, this) in [(&na, &a, true), (&nb, &b, false)] {
        let n = &listed[node.as_str()];
        assert_eq!(n["this"], this, "{n}");
        assert_eq!(n["stopped"], false, "{n}");
        assert_eq!(n["listen"], d.url.trim_start_matches("http://"), "{n}");
        assert!(n["heartbeat_age_seconds"].as_f64().unwrap() < 30.0, "{n}");
    }
    let (_, metrics) = b.call("GET", "/metrics", None);
    let text = metrics["raw"].as_str().unwrap();
    let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(!series.is_empty());
    for line in series {
        assert!(line.contains(&format!("node=\"{nb}\"")), "{line}");
    }
    // A daemon that stops cleanly says so to the others.
    let (code, _) = b.terminate();
    assert_eq!(code, 0);
    let (_, status) = a.call("GET", "/v1/status", None);
    let stopped = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == nb.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(stopped["stopped"], true, "{status}");
}

#[test]
fn a_queue_file_is_refused_where_the_database_holds_the_queue() {
    let sink = Recorder::new(Duration::ZERO);
    let Some(p) = cluster_project(
        "cluster::a_queue_file_is_refused_where_the_database_holds_the_queue",
        &sink,
        &[("sms", 100, "")],
    ) else {
        return;
    };
    let out = p.run_env(
        &[
            "daemon",
            "--listen",
            "127.0.0.1:0",
            "--insecure-no-auth",
            "--queue",
            "queue.db",
        ],
        &ENV,
    );
    out.code(1).stderr_has(
        "--state names a PostgreSQL database, which holds the queue every daemon on it shares: leave out --queue (to move a SQLite queue into the database, use `touchctl state migrate`)",
    );
    let out = p.run(&["force-unlock", "--daemon"]);
    out.code(1).stderr_has(
        "daemons sharing a PostgreSQL queue hold no lock on it to release: each holds leases on the batches it is sending, and a daemon that is gone leaves them to expire (after --lease-ttl, 30 s by default); the other daemons then take its batches over",
    );
    // Nothing was created where the file was named, and the database's queue is as it was.
    assert!(!p.path().join("queue.db").exists());
    let count: i64 = p.query_one("SELECT count(*) FROM batches");
    assert_eq!(count, 0);
    // The delivery commands read the database's queue.
    p.run(&["deliveries", "list"])
        .code(0)
        .stdout_has("No batches match.");
}
