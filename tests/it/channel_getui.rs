//! The Getui channel end to end: the real daemon delivering the sample `app-push` touchpoint to the
//! real `touchctl sandbox`, driven through the sandbox's fault API.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::daemon_support::{Daemon, PATIENCE, SandboxProcess};
use crate::support::Project;

const APP: &str = "Kq3Lm8Np2Rs5Tv7Wx9Yz1";
const KEY: &str = "Ab4Cd6Ef8Gh0Ij2Kl4Mn6";
const FILE: &str = "touchpoints/channels/getui.toml";
const SECRET: &str = "secrets/sandbox/getui_master_secret";

/// The samples, the sandbox serving them, the Getui touchpoint pointed at it and applied.
fn setup() -> (Project, SandboxProcess) {
    let p = Project::with_samples();
    let s = p.start_sandbox(&[]);
    p.set(FILE, "http://127.0.0.1:8641", &s.url);
    p.run(&["apply", "--auto-approve"]).code(0);
    (p, s)
}

fn daemon(p: &Project) -> Daemon {
    p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &[])
}

/// Users `u{i}` on devices `cid-{i}`, for `i` in `range`.
fn users(range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| json!({"user_id": format!("u{i}"), "attributes": {"getui_cid": format!("cid-{i}")}}))
        .collect()
}

/// Sends a trigger of `users` and waits until it is finished; returns its id and status.
fn push(d: &Daemon, key: &str, users: Vec<Value>) -> (String, Value) {
    let id = accept(d, key, users);
    let status = d.wait_finished(&id);
    (id, status)
}

/// Sends a trigger of `users`; returns its dispatch id once accepted.
fn accept(d: &Daemon, key: &str, users: Vec<Value>) -> String {
    let (code, r) = d.dispatch(&json!({
        "touchpoint": "app-push",
        "campaign": "member-day",
        "idempotency_key": key,
        "body": "满 100 减 20",
        "users": users,
    }));
    assert_eq!(code, 202, "{r}");
    r["dispatch_id"].as_str().unwrap().to_string()
}

fn endpoint(path: &str) -> String {
    format!("/v2/{APP}/{path}")
}

/// The sandbox's log of Getui requests to `path` (`auth`, `push/list/message`, `push/list/cid`).
fn log(s: &SandboxProcess, path: &str) -> Vec<Value> {
    s.messages("channel=getui")
        .into_iter()
        .filter(|m| m["endpoint"] == endpoint(path))
        .collect()
}

/// Every cid the sandbox delivered, in order.
fn delivered(s: &SandboxProcess) -> Vec<String> {
    log(s, "push/list/cid")
        .iter()
        .flat_map(|m| m["delivered"].as_array().cloned().unwrap_or_default())
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

fn cids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("cid-{i}")).collect()
}

fn app_push(d: &Daemon) -> Value {
    let (code, tps) = d.call("GET", "/v1/touchpoints", None);
    assert_eq!(code, 200, "{tps}");
    tps["touchpoints"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["id"] == "app-push"))
        .cloned()
        .unwrap_or_else(|| panic!("no app-push in {tps}"))
}

#[test]
fn getui_push_reaches_the_sandbox_as_one_task_pushed_to_the_batch_s_cids() {
    let (p, s) = setup();
    let d = daemon(&p);
    let (id, status) = push(&d, "happy", users(1..4));
    assert_eq!(
        (status["delivered"].as_u64(), status["failed"].as_u64()),
        (Some(3), Some(0)),
        "{status}"
    );
    let all = s.messages("channel=getui");
    assert_eq!(all.len(), 3, "{all:?}");
    let auth = &all[0];
    assert_eq!(
        (&auth["kind"], &auth["touchpoint"], &auth["endpoint"]),
        (
            &json!("token"),
            &json!("app-push"),
            &json!(endpoint("auth"))
        )
    );
    assert_eq!(auth["answer"], json!({"http_status": 200, "code": 0}));
    assert_eq!(auth["body"]["appkey"], KEY);
    let sign = auth["body"]["sign"].as_str().unwrap();
    assert!(sign.len() == 64 && sign.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!auth.to_string().contains(p.read(SECRET).trim()));

    let message = &all[1];
    assert_eq!(message["endpoint"], endpoint("push/list/message"));
    assert_eq!(message["answer"], json!({"http_status": 200, "code": 0}));
    let request_id = message["body"]["request_id"].as_str().unwrap();
    assert!(request_id.len() == 32 && request_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        message["body"],
        json!({
            "request_id": request_id,
            "settings": {"ttl": 86_400_000},
            "push_message": {"notification": {
                "title": "会员专享", "body": "满 100 减 20", "click_type": "none"
            }},
        })
    );
    assert_eq!(message["duplicate"], false);

    let list = &all[2];
    assert_eq!(list["endpoint"], endpoint("push/list/cid"));
    let taskid = list["body"]["taskid"].as_str().unwrap();
    assert!(taskid.starts_with("RASL_"), "{taskid}");
    assert_eq!(
        list["body"],
        json!({"audience": {"cid": cids(1..4)}, "taskid": taskid, "is_async": false})
    );
    assert_eq!(list["recipients"], json!(cids(1..4)));
    assert_eq!(list["delivered"], json!(cids(1..4)));
    assert_eq!(
        (&list["failed"], &list["duplicate"], &list["answer"]),
        (
            &json!([]),
            &json!(false),
            &json!({"http_status": 200, "code": 0})
        )
    );
    p.run(&["deliveries", "show", &format!("{id}_0")])
        .code(0)
        .stdout_has("→ delivered")
        .stdout_has("recipients: 3 in all, 3 delivered, 0 failed, 0 remaining");
}

#[test]
fn getui_token_expiry_mid_run_costs_one_auth_and_no_duplicate() {
    let (p, s) = setup();
    let d = daemon(&p);
    push(&d, "first", users(1..3));
    s.faults(&json!([{"channel": "getui", "action": "expire_tokens"}]));
    let (_, status) = push(&d, "second", users(3..5));
    assert_eq!(status["delivered"], 2, "{status}");
    let requests: Vec<(String, Value)> = s
        .messages("channel=getui")
        .iter()
        .map(|m| {
            let path = m["endpoint"].as_str().unwrap();
            let short = path.trim_start_matches(&format!("/v2/{APP}/")).to_string();
            (short, m["answer"]["code"].clone())
        })
        .collect();
    let expected: Vec<(String, Value)> = [
        ("auth", 0),
        ("push/list/message", 0),
        ("push/list/cid", 0),
        // The expired token is refused once, a new one fetched, the request sent once more.
        ("push/list/message", 10001),
        ("auth", 0),
        ("push/list/message", 0),
        ("push/list/cid", 0),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_string(), json!(c)))
    .collect();
    assert_eq!(requests, expected);
    assert_eq!(delivered(&s), cids(1..5), "each device once");
    assert!(
        s.messages("channel=getui")
            .iter()
            .all(|m| m["duplicate"] == false)
    );
}

#[test]
fn getui_a_retried_batch_makes_no_second_task_and_pushes_no_device_twice() {
    let (p, s) = setup();
    // The first push of the task fails as a proxy would: the batch is tried again.
    s.faults(&json!([{
        "channel": "getui", "match": {"endpoint": "send"},
        "action": "error", "http_status": 503, "count": 2
    }]));
    let d = daemon(&p);
    let (id, status) = push(&d, "retried", users(1..4));
    assert_eq!(status["delivered"], 3, "{status}");
    let messages = log(&s, "push/list/message");
    let answered: Vec<u64> = messages
        .iter()
        .map(|m| m["answer"]["http_status"].as_u64().unwrap())
        .collect();
    assert_eq!(answered, [503, 503, 200], "{messages:?}");
    let ids: Vec<&Value> = messages.iter().map(|m| &m["body"]["request_id"]).collect();
    assert!(ids.iter().all(|r| *r == ids[0]), "one request_id: {ids:?}");
    assert_eq!(delivered(&s), cids(1..4));
    p.run(&["deliveries", "show", &format!("{id}_0")])
        .code(0)
        .stdout_has("HTTP 503")
        .stdout_has("→ retry")
        .stdout_has("→ delivered");
}

#[test]
fn getui_rate_limits_make_the_touchpoint_wait_to_the_next_minute_then_deliver() {
    let (p, s) = setup();
    s.faults(&json!([{"channel": "getui", "action": "rate_limit", "code": 10005, "count": 1}]));
    let d = daemon(&p);
    let id = accept(&d, "limited", users(1..4));
    // The summary seen waiting (the wait may be over by the time it is asked again).
    let seen = std::cell::RefCell::new(Value::Null);
    d.wait_until("/v1/touchpoints", "app-push never waited", |_, _| {
        let tp = app_push(&d);
        let waiting = tp["state"] == "waiting";
        *seen.borrow_mut() = tp;
        waiting
    });
    let tp = seen.into_inner();
    assert_eq!(tp["code"], "10005", "{tp}");
    let until = tp["until"].as_str().unwrap().to_string();
    assert!(
        until.ends_with(":01Z"),
        "a second into the next minute: {until}"
    );
    assert!(
        tp["held"]
            .as_str()
            .unwrap()
            .contains("sending resumes at the next minute"),
        "{tp}"
    );
    // A rate limit waits up to a minute: allow that on top of the usual patience.
    let deadline = Instant::now() + PATIENCE + Duration::from_secs(60);
    let status = loop {
        let (_, s) = d.call("GET", &format!("/v1/dispatches/{id}"), None);
        if s["finished"] == true {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered after the wait: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["delivered"], 3, "{status}");
    let sent = log(&s, "push/list/message");
    let after = sent.last().unwrap();
    assert_eq!(after["answer"]["code"], 0);
    assert_eq!(delivered(&s), cids(1..4));
    // The batch waited, uncounted, and was sent once the minute began.
    let until_ms = humantime::parse_rfc3339(&until)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(now_ms >= until_ms);
    p.run(&["deliveries", "show", &format!("{id}_0")])
        .code(0)
        .stdout_has("10005")
        .stdout_has("→ deferred")
        .stdout_has("→ delivered");
}

#[test]
fn getui_devices_the_platform_refuses_fail_alone_with_its_code() {
    let (p, s) = setup();
    s.faults(
        &json!([{"channel": "getui", "action": "fail_users", "ids": ["cid-2"], "code": 20001}]),
    );
    let d = daemon(&p);
    let (id, status) = push(&d, "some-fail", users(1..4));
    assert_eq!(
        (status["delivered"].as_u64(), status["failed"].as_u64()),
        (Some(2), Some(1)),
        "{status}"
    );
    assert_eq!(delivered(&s), ["cid-1", "cid-3"]);
    p.run(&["deliveries", "show", &format!("{id}_0")])
        .code(0)
        .stdout_has("u2: 20001 target user is invalid")
        .stdout_has("recipients: 3 in all, 2 delivered, 1 failed, 0 remaining");
}

#[test]
fn getui_a_bad_master_secret_holds_the_touchpoint_until_the_fixed_one_is_applied() {
    let (p, s) = setup();
    let good = p.read(SECRET);
    p.write(SECRET, "not-the-master-secret\n");
    p.run(&["apply", "--auto-approve"]).code(0);
    let d = daemon(&p);
    let id = accept(&d, "held", users(1..4));
    d.wait_until("/v1/touchpoints", "app-push was not held", |_, _| {
        app_push(&d)["state"] == "held"
    });
    let tp = app_push(&d);
    assert_eq!(tp["code"], "20001", "{tp}");
    let reason = tp["held"].as_str().unwrap();
    assert!(reason.contains("sign is invalid"), "{reason}");
    assert!(reason.contains("`master_secret`"), "{reason}");
    assert!(!reason.contains("not-the-master-secret"));
    d.wait_until("/v1/touchpoints", "the batch was not parked", |_, _| {
        app_push(&d)["held_batches"] == 1
    });
    let (_, progress) = d.call("GET", &format!("/v1/dispatches/{id}"), None);
    assert_eq!(progress["finished"], false, "{progress}");
    p.run(&["deliveries", "list", "--status", "pending"])
        .code(0)
        .stdout_has("sign is invalid");
    assert!(delivered(&s).is_empty());

    p.write(SECRET, &good);
    p.run(&["apply", "--auto-approve"]).code(0);
    let status = d.wait_finished(&id);
    assert_eq!(status["delivered"], 3, "{status}");
    assert_eq!(app_push(&d)["state"], "ready");
    assert_eq!(delivered(&s), cids(1..4));
}

#[test]
fn getui_plan_refresh_shows_a_refused_master_secret_as_a_warning() {
    let (p, _s) = setup();
    let good = p.run(&["plan", "--refresh", "--allow-private-network"]);
    good.code(0)
        .stdout_has("Plan: 0 to create, 0 to update, 0 to delete");
    assert!(!good.stdout.contains("! app-push:"), "{}", good.stdout);
    good.stdout_has("ok app-push: Getui auth succeeded for app `Kq3Lm8Np2Rs5Tv7Wx9Yz1`");
    p.write(SECRET, "not-the-master-secret\n");
    let out = p.run(&["plan", "--refresh", "--allow-private-network"]);
    out.code(0).stdout_has(
        "! app-push: Getui refused auth (20001 sign is invalid): check `app_key` and `master_secret` against the app in the Getui console",
    );
    assert!(!out.all().contains("not-the-master-secret"));
}
