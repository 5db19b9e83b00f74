//! The WeChat Official Account channel end to end: the real daemon delivering the sample `wechat-oa`
//! touchpoint to the real `touchctl sandbox`, driven through the sandbox's fault API.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::Backend;
use crate::daemon_support::{Daemon, PATIENCE, SandboxProcess};
use crate::support::Project;

const OA: &str = "touchpoints/channels/wechat-oa.toml";
const SECRET: &str = "secrets/sandbox/oa_app_secret";

/// A running `touchctl sandbox`, over its own copy of the samples (so the daemon's copy may hold
/// another secret).
struct Sandbox {
    process: SandboxProcess,
    _project: Project,
}

impl std::ops::Deref for Sandbox {
    type Target = SandboxProcess;
    fn deref(&self) -> &SandboxProcess {
        &self.process
    }
}

impl Sandbox {
    fn start() -> Self {
        let project = Project::with_samples();
        Self {
            process: project.start_sandbox(&[]),
            _project: project,
        }
    }

    /// The template sends it received.
    fn sends(&self) -> Vec<Value> {
        self.messages("channel=oa&kind=message")
    }

    /// Waits until `done` accepts what it received on the OA endpoints.
    fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let until = Instant::now() + PATIENCE;
        loop {
            let got = self.messages("channel=oa");
            if done(&got) {
                return;
            }
            assert!(Instant::now() < until, "{what}: {got:?}\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The samples, `wechat-oa` pointed at the sandbox with a `name` dynamic param, applied.
fn project(sandbox: &Sandbox) -> Project {
    project_on(Backend::Sqlite, sandbox)
}

/// [`project`] with its registry (and queue) on `backend`.
fn project_on(backend: Backend, sandbox: &Sandbox) -> Project {
    let p = Project::with_samples_on(backend);
    p.set(OA, "http://127.0.0.1:8641", &sandbox.url).set(
        OA,
        "openid = \"user.wechat_openid\"",
        "openid = \"user.wechat_openid\"\nname = \"user.name\"",
    );
    p.run(&["apply", "--auto-approve"]).code(0);
    p
}

fn daemon(p: &Project) -> Daemon {
    p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &[])
}

fn users(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"user_id": format!("u{i}"), "attributes": {"wechat_openid": format!("o{i}"), "name": format!("会员{i}")}}))
        .collect()
}

fn trigger(key: &str, n: usize) -> Value {
    json!({
        "touchpoint": "wechat-oa",
        "campaign": "spring",
        "idempotency_key": key,
        "template": "order_shipped",
        "template_params": {"first": "{{name}}，您的订单已发货", "keyword1": "SF1234", "keyword2": 3, "remark": "感谢惠顾"},
        "users": users(n),
    })
}

/// Sends a trigger; returns its dispatch id.
fn dispatch(d: &Daemon, trigger: &Value) -> String {
    let (code, r) = d.dispatch(trigger);
    assert_eq!(code, 202, "{r}");
    r["dispatch_id"].as_str().unwrap().to_string()
}

/// Waits until the dispatch is finished; returns how many recipients were delivered and failed.
fn outcome(d: &Daemon, id: &str) -> (u64, u64) {
    let s = d.wait_finished(id);
    (
        s["delivered"].as_u64().unwrap(),
        s["failed"].as_u64().unwrap(),
    )
}

/// How many sends delivered each openid, a duplicate not counted.
fn deliveries(sends: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in sends.iter().filter(|s| s["duplicate"] == false) {
        for id in s["delivered"].as_array().unwrap() {
            *out.entry(id.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    out
}

/// Every openid `o0..o{n}` delivered exactly once.
#[track_caller]
fn each_once(sends: &[Value], n: usize) {
    let got = deliveries(sends);
    let want: BTreeMap<String, usize> = (0..n).map(|i| (format!("o{i}"), 1)).collect();
    assert_eq!(got, want);
}

/// The daemon's view of `wechat-oa` once `done` accepts it.
fn touchpoint(d: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let body = d.wait_until("/v1/touchpoints", what, |code, body| {
        code == 200
            && body["touchpoints"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"] == "wechat-oa" && done(t))
    });
    body["touchpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "wechat-oa")
        .cloned()
        .unwrap()
}

#[test]
fn oa_sends_one_template_message_per_recipient_with_one_token() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    let d = daemon(&p);
    let id = dispatch(&d, &trigger("happy", 3));
    assert_eq!(outcome(&d, &id), (3, 0));
    let tokens = sandbox.messages("channel=oa&kind=token");
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(tokens[0]["touchpoint"], "wechat-oa");
    assert_eq!(tokens[0]["answer"], json!({"http_status": 200, "code": 0}));
    let mut sends = sandbox.sends();
    sends.sort_by_key(|s| s["body"]["touser"].as_str().unwrap().to_string());
    let batch = format!("{id}_0");
    let got: Vec<Value> = sends
        .into_iter()
        .map(|mut s| {
            s.as_object_mut().unwrap().remove("seq");
            s
        })
        .collect();
    let want: Vec<Value> = (0..3)
        .map(|i| {
            let openid = format!("o{i}");
            json!({
                "channel": "oa", "kind": "message", "touchpoint": "wechat-oa",
                "endpoint": "/cgi-bin/message/template/send",
                "recipients": [openid], "delivered": [openid], "failed": [], "duplicate": false,
                "answer": {"http_status": 200, "code": 0},
                "body": {
                    "touser": openid,
                    "template_id": "TM00015-kD3xq8Vb",
                    "url": "https://m.example.com/orders",
                    "client_msg_id": touchctl::channel::wechat::client_msg_id(&batch, &format!("u{i}")),
                    "data": {
                        "first": {"value": format!("会员{i}，您的订单已发货")},
                        "keyword1": {"value": "SF1234"},
                        "keyword2": {"value": "3"},
                        "remark": {"value": "感谢惠顾"},
                    }
                }
            })
        })
        .collect();
    assert_eq!(got, want);
    // No token in what the daemon logged or recorded.
    let queue = rusqlite::Connection::open(p.path().join(".touchctl/queue.db")).unwrap();
    let errors: Vec<String> = queue
        .prepare("SELECT coalesce(error, '') FROM attempts")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(errors, [""], "one attempt, no error");
    assert!(!d.log().contains("access_token="), "{}", d.log());
}

#[test]
fn oa_tokens_expired_mid_run_are_fetched_again_and_no_one_gets_two_messages() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    let d = daemon(&p);
    sandbox.faults(&json!([{"channel": "oa", "match": {"endpoint": "send"}, "action": "slow", "delay": "30ms"}]));
    let id = dispatch(&d, &trigger("expiry", 60));
    sandbox.wait_for("the run started", |got| {
        got.iter().filter(|m| m["kind"] == "message").count() >= 8
    });
    sandbox.faults(&json!([{"channel": "oa", "action": "expire_tokens"}]));
    assert_eq!(outcome(&d, &id), (60, 0));
    let sends = sandbox.sends();
    let refused = sends
        .iter()
        .filter(|m| m["answer"]["code"] == 42001)
        .count();
    assert!(refused >= 1, "no send met the expired token: {sends:?}");
    assert_eq!(
        sandbox.messages("channel=oa&kind=token").len(),
        2,
        "one new token for all the refusals"
    );
    each_once(&sends, 60);
    assert!(sends.iter().all(|m| m["duplicate"] == false), "{sends:?}");
}

#[test]
fn oa_rate_limits_make_the_touchpoint_wait_then_everyone_is_delivered() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    let d = daemon(&p);
    sandbox.faults(&json!([{"channel": "oa", "match": {"endpoint": "send"}, "action": "rate_limit", "code": 45011, "count": 1}]));
    let id = dispatch(&d, &trigger("limited", 5));
    let tp = touchpoint(&d, "the touchpoint never waited", |t| {
        t["state"] == "waiting"
    });
    assert_eq!(tp["code"], "45011", "{tp}");
    assert!(
        tp["held"]
            .as_str()
            .unwrap()
            .contains("sending waits until the next minute"),
        "{tp}"
    );
    // Until the next minute starts (and a second more).
    let until = humantime::parse_rfc3339_weak(tp["until"].as_str().unwrap())
        .or_else(|_| humantime::parse_rfc3339(tp["until"].as_str().unwrap()))
        .unwrap();
    let since_epoch = until
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert_eq!(since_epoch % 60_000, 1_000, "{tp}");
    // The wait ends within a minute; then everyone is delivered, once.
    let deadline = Instant::now() + Duration::from_secs(150);
    let s = loop {
        let (code, s) = d.call("GET", &format!("/v1/dispatches/{id}"), None);
        assert_eq!(code, 200, "{s}");
        if s["finished"] == true {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "never delivered after the wait: {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(s["delivered"], 5, "{s}");
    let sends = sandbox.sends();
    assert_eq!(
        sends
            .iter()
            .filter(|m| m["answer"]["code"] == 45011)
            .count(),
        1
    );
    each_once(&sends, 5);
}

#[test]
fn oa_busy_answers_retry_those_recipients() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    let d = daemon(&p);
    sandbox.faults(&json!([{"channel": "oa", "match": {"endpoint": "send"}, "action": "error", "code": -1, "count": 2}]));
    let id = dispatch(&d, &trigger("busy", 4));
    assert_eq!(outcome(&d, &id), (4, 0));
    let sends = sandbox.sends();
    assert_eq!(
        sends.iter().filter(|m| m["answer"]["code"] == -1).count(),
        2
    );
    each_once(&sends, 4);
    p.run(&["deliveries", "show", &format!("{id}_0")])
        .code(0)
        .stdout_has("2 to retry (-1 system error");
}

#[test]
fn oa_users_the_platform_refuses_fail_alone_with_its_code() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    let d = daemon(&p);
    sandbox.faults(&json!([
        {"channel": "oa", "action": "fail_users", "ids": ["o1"], "code": 43004},
        {"channel": "oa", "action": "fail_users", "ids": ["o3"], "code": 43019},
    ]));
    let id = dispatch(&d, &trigger("refused", 5));
    assert_eq!(outcome(&d, &id), (3, 2));
    let sends = sandbox.sends();
    let got = deliveries(&sends);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["o0", "o2", "o4"]);
    // Failed for good: asked once each.
    assert_eq!(sends.len(), 5, "{sends:?}");
    p.run(&["deliveries", "show", &format!("{id}_0")])
        .code(0)
        .stdout_has("u1: 43004 require subscribe")
        .stdout_has("u3: 43019 require remove blacklist")
        .stdout_has("5 in all, 3 delivered, 2 failed, 0 remaining");
}

#[test]
fn oa_a_refused_secret_holds_the_touchpoint_until_a_fixed_one_is_applied() {
    let sandbox = Sandbox::start();
    let p = Project::with_samples();
    let right = p.read(SECRET);
    p.write(SECRET, "not-the-app-secret\n");
    p.set(OA, "http://127.0.0.1:8641", &sandbox.url);
    p.run(&["apply", "--auto-approve"]).code(0);
    let d = daemon(&p);
    let mut t = trigger("held", 3);
    t["template_params"]["first"] = "您的订单已发货".into();
    let id = dispatch(&d, &t);
    let tp = touchpoint(&d, "the touchpoint was never held", |t| {
        t["state"] == "held" && t["held_batches"] == 1
    });
    assert_eq!(tp["code"], "40125", "{tp}");
    let held = tp["held"].as_str().unwrap();
    assert!(held.contains("40125 invalid appsecret"), "{held}");
    assert!(held.contains("`auth.app_secret`"), "{held}");
    assert!(!held.contains("not-the-app-secret"), "{held}");
    assert!(sandbox.sends().is_empty());
    // New triggers are refused while it is held.
    let (code, r) = d.dispatch(&trigger("held-2", 1));
    assert_eq!(code, 409, "{r}");
    assert_eq!(r["error"]["code"], "touchpoint_held", "{r}");

    p.write(SECRET, &right);
    p.run(&["apply", "--auto-approve"])
        .code(0)
        .stdout_has("(sensitive value changed)");
    assert_eq!(outcome(&d, &id), (3, 0));
    each_once(&sandbox.sends(), 3);
    touchpoint(&d, "the touchpoint was never ready again", |t| {
        t["state"] == "ready"
    });
}

/// issue 23, "Done when": a `kill -9` during an OA run loses nothing, and no openid gets a second
/// message WeChat would deliver (a resent message carries the same `client_msg_id`).
#[test]
fn oa_kill_9_mid_run_loses_nothing_and_sends_no_one_twice() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    sandbox.faults(&json!([{"channel": "oa", "match": {"endpoint": "send"}, "action": "slow", "delay": "60ms"}]));
    let d = daemon(&p);
    let id = dispatch(&d, &trigger("crash", 300));
    sandbox.wait_for("the run started", |got| {
        got.iter().filter(|m| m["kind"] == "message").count() >= 40
    });
    d.kill9();
    let before = sandbox.sends().len();
    assert!(
        before < 300,
        "killed mid-run, yet {before} of 300 messages had arrived"
    );

    let d = daemon(&p);
    assert_eq!(outcome(&d, &id), (300, 0));
    let sends = sandbox.sends();
    each_once(&sends, 300);
    // The batches cut off were sent again whole; WeChat recognised the messages already sent.
    let again: Vec<&Value> = sends.iter().filter(|m| m["duplicate"] == true).collect();
    assert!(
        !again.is_empty(),
        "no message was sent again after the kill"
    );
    let first_ids: BTreeMap<&str, &str> = sends
        .iter()
        .filter(|m| m["duplicate"] == false)
        .map(|m| {
            (
                m["body"]["touser"].as_str().unwrap(),
                m["body"]["client_msg_id"].as_str().unwrap(),
            )
        })
        .collect();
    for m in &again {
        let openid = m["body"]["touser"].as_str().unwrap();
        assert_eq!(
            Some(&m["body"]["client_msg_id"].as_str().unwrap()),
            first_ids.get(openid),
            "{m}"
        );
    }
    let distinct: BTreeSet<&str> = sends
        .iter()
        .map(|m| m["body"]["client_msg_id"].as_str().unwrap())
        .collect();
    assert_eq!(distinct.len(), 300);
}

#[test]
fn oa_plan_refresh_shows_a_refused_secret_without_it() {
    let sandbox = Sandbox::start();
    let p = Project::with_samples();
    p.set(OA, "http://127.0.0.1:8641", &sandbox.url);
    let right = p.read(SECRET);
    let plan = |p: &Project| p.run(&["plan", "--refresh", "--allow-private-network"]);
    let good = plan(&p);
    good.code(0);
    assert!(!good.stdout.contains("! wechat-oa"), "{}", good.all());

    p.write(SECRET, "not-the-app-secret\n");
    let bad = plan(&p);
    bad.code(0)
        .stdout_has("! wechat-oa: 40125 invalid appsecret rid: ")
        .stdout_has("WeChat refused the AppSecret: put the account's current AppSecret");
    assert!(!bad.all().contains("not-the-app-secret"), "{}", bad.all());
    assert!(!bad.all().contains(right.trim()), "{}", bad.all());
    // Two token requests: the good plan's and the bad one's; no message.
    assert_eq!(sandbox.messages("channel=oa&kind=token").len(), 2);
    assert!(sandbox.sends().is_empty());
}

/// issue 25: the token a daemon obtained is kept in the registry, so a restarted daemon sends with
/// it instead of spending another of WeChat's daily token calls; the key it is kept under is a
/// MAC, and the token shows in no log.
#[test]
fn oa_a_restarted_daemon_sends_with_the_token_it_kept_in_the_registry() {
    let sandbox = Sandbox::start();
    let p = project(&sandbox);
    let d = daemon(&p);
    let id = dispatch(&d, &trigger("before", 2));
    assert_eq!(outcome(&d, &id), (2, 0));
    let (code, first_log) = d.terminate();
    assert_eq!(code, 0, "{first_log}");

    let d = daemon(&p);
    let id = dispatch(&d, &trigger("after", 2));
    assert_eq!(outcome(&d, &id), (2, 0));
    let tokens = sandbox.messages("channel=oa&kind=token");
    assert_eq!(
        tokens.len(),
        1,
        "the restarted daemon fetched again: {tokens:?}"
    );
    assert_eq!(sandbox.sends().len(), 4);

    let state = rusqlite::Connection::open(p.path().join(".touchctl/state.db")).unwrap();
    let (key, token, by): (String, String, String) = state
        .query_row(
            "SELECT key, token, obtained_by FROM shared_tokens",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(key.starts_with("hmac-sha256:"), "{key}");
    assert!(!token.is_empty());
    assert!(!by.is_empty(), "who obtained it is kept");
    let log = format!("{first_log}{}", d.log());
    assert!(!log.contains(&token), "{log}");
    assert!(!log.contains("shared through the registry"), "{log}");
}

/// issue 25, "Platform tokens across nodes": two daemons on one PostgreSQL send one account's
/// batches side by side with the one token one of them obtained.
#[test]
fn oa_two_daemons_on_one_postgresql_fetch_one_token() {
    if !Backend::Postgres.available("oa_two_daemons_on_one_postgresql_fetch_one_token") {
        return;
    }
    let sandbox = Sandbox::start();
    let p = project_on(Backend::Postgres, &sandbox);
    sandbox.faults(&json!([{"channel": "oa", "match": {"endpoint": "send"}, "action": "slow", "delay": "40ms"}]));
    let daemons = [daemon(&p), daemon(&p)];
    let ids: Vec<(usize, String)> = (0..8)
        .map(|i| {
            let d = i % 2;
            (d, dispatch(&daemons[d], &trigger(&format!("pair-{i}"), 6)))
        })
        .collect();
    for (d, id) in &ids {
        assert_eq!(outcome(&daemons[*d], id), (6, 0));
    }
    let nodes: i64 = p.query_one("SELECT count(DISTINCT node) FROM attempts");
    assert_eq!(nodes, 2, "both daemons sent batches");
    let tokens = sandbox.messages("channel=oa&kind=token");
    assert_eq!(
        tokens.len(),
        1,
        "each daemon fetched its own token: {tokens:?}"
    );
    let kept: i64 =
        p.query_one("SELECT count(*) FROM shared_tokens WHERE key NOT LIKE 'fetching:%'");
    assert_eq!(kept, 1);
    for d in &daemons {
        assert!(
            !d.log().contains("shared through the registry"),
            "{}",
            d.log()
        );
    }
}
