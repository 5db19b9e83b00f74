//! The WeCom channel end to end: the real daemon sends the sample `wecom-stores` touchpoint's
//! batches to the real `touchctl sandbox`, driven through its fault API: what the sandbox received,
//! token expiry mid-run, rate limits, per-user failures, a refused secret that holds the
//! touchpoint until a fixed one is applied, and customers' mass messages.

use serde_json::{Value, json};

use crate::daemon_support::{Daemon, SandboxProcess};
use crate::support::Project;

const FILE: &str = "touchpoints/channels/wecom.toml";
const SECRET_FILE: &str = "secrets/sandbox/wecom_secret";
const SEND: &str = "/cgi-bin/message/send";

/// The samples, the sandbox on them, the WeCom touchpoint pointed at it (after `edit`), applied,
/// and a daemon.
fn setup(edit: impl FnOnce(&Project)) -> (Project, SandboxProcess, Daemon) {
    let p = Project::with_samples();
    let s = p.start_sandbox(&[]);
    p.set(FILE, "http://127.0.0.1:8641", &s.url);
    edit(&p);
    p.run(&["apply", "--auto-approve"]).code(0);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &[]);
    (p, s, d)
}

/// A trigger of the sample template to members with these userids (users `u1`, `u2`, ...).
fn trigger(key: &str, userids: &[&str]) -> Value {
    let users: Vec<Value> = userids
        .iter()
        .enumerate()
        .map(
            |(i, id)| json!({"user_id": format!("u{}", i + 1), "attributes": {"wecom_userid": id}}),
        )
        .collect();
    json!({
        "touchpoint": "wecom-stores",
        "campaign": "spring-arrivals",
        "idempotency_key": key,
        "template": "new_arrivals",
        "template_params": {"title": "新品上架", "description": "本周新品到店"},
        "users": users,
    })
}

/// `POST /v1/dispatch` of `trigger` as NDJSON (the head on the first line, then the users), the
/// form that names a template in every version of the intake.
fn post(d: &Daemon, trigger: &Value) -> (u16, Value) {
    let mut head = trigger.clone();
    let users = head
        .as_object_mut()
        .and_then(|h| h.remove("users"))
        .unwrap_or_default();
    let mut body = head.to_string();
    for u in users.as_array().into_iter().flatten() {
        body.push('\n');
        body.push_str(&u.to_string());
    }
    d.call(
        "POST",
        "/v1/dispatch",
        Some(("application/x-ndjson", body.into_bytes())),
    )
}

/// Sends `trigger`; returns the dispatch id.
fn dispatch(d: &Daemon, trigger: &Value) -> String {
    let (code, r) = post(d, trigger);
    assert_eq!(code, 202, "{r}");
    r["dispatch_id"].as_str().unwrap().to_string()
}

/// The WeCom message requests the sandbox received.
fn sends(s: &SandboxProcess) -> Vec<Value> {
    s.messages("channel=wecom&kind=message")
}

/// `touchctl deliveries show` of the dispatch's only batch.
fn show(p: &Project, dispatch_id: &str) -> String {
    let run = p.run(&["deliveries", "show", &format!("{dispatch_id}_0")]);
    run.code(0);
    run.stdout.clone()
}

/// The touchpoint as `GET /v1/touchpoints` shows it.
fn listed(tps: &Value) -> Value {
    tps.as_array()
        .or_else(|| tps["touchpoints"].as_array())
        .and_then(|all| all.iter().find(|t| t["id"] == "wecom-stores"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn wecom_members_get_one_message_send_with_every_userid() {
    let (_p, s, d) = setup(|_| {});
    let id = dispatch(&d, &trigger("happy", &["ZhangSan", "lisi", "wangwu"]));
    let status = d.wait_finished(&id);
    assert_eq!(status["delivered"], 3, "{status}");
    let got = sends(&s);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0],
        json!({
            "seq": got[0]["seq"],
            "channel": "wecom",
            "kind": "message",
            "touchpoint": "wecom-stores",
            "endpoint": SEND,
            "recipients": ["ZhangSan", "lisi", "wangwu"],
            "delivered": ["ZhangSan", "lisi", "wangwu"],
            "failed": [],
            "duplicate": false,
            "answer": {"http_status": 200, "code": 0},
            "body": {
                "touser": "ZhangSan|lisi|wangwu",
                "msgtype": "news",
                "agentid": 1000005,
                "news": {"articles": [{
                    "title": "新品上架",
                    "description": "本周新品到店",
                    "url": "https://m.example.com/new"
                }]},
                "safe": 0,
                "enable_duplicate_check": 1,
                "duplicate_check_interval": 1800
            }
        })
    );
    let tokens = s.messages("channel=wecom&kind=token");
    assert_eq!(tokens.len(), 1, "one token for the whole run: {tokens:?}");
    assert_eq!(tokens[0]["answer"]["code"], 0);
    // A placeholder cannot be filled per recipient in one message to many: 422, named.
    let mut personal = trigger("personal", &["ZhangSan"]);
    personal["template_params"]["title"] = json!("{{userid}} 的新品");
    let (code, body) = post(&d, &personal);
    assert_eq!(code, 422, "{body}");
    assert!(
        body.to_string().contains("one message to many recipients"),
        "{body}"
    );
}

#[test]
fn wecom_token_expired_mid_run_is_fetched_again_and_nothing_sent_twice() {
    let (_p, s, d) = setup(|_| {});
    let first = dispatch(&d, &trigger("before", &["ZhangSan"]));
    d.wait_finished(&first);
    s.faults(&json!([{"channel": "wecom", "action": "expire_tokens"}]));
    let second = dispatch(&d, &trigger("after", &["lisi", "wangwu"]));
    let status = d.wait_finished(&second);
    assert_eq!(status["delivered"], 2, "{status}");
    let got = sends(&s);
    let answers: Vec<&Value> = got.iter().map(|m| &m["answer"]["code"]).collect();
    assert_eq!(answers, [0, 42001, 0], "{got:?}");
    assert_eq!(got[1]["delivered"], json!([]));
    // Every recipient delivered exactly once.
    let mut delivered: Vec<&str> = got
        .iter()
        .flat_map(|m| m["delivered"].as_array().unwrap())
        .map(|v| v.as_str().unwrap())
        .collect();
    delivered.sort_unstable();
    assert_eq!(delivered, ["ZhangSan", "lisi", "wangwu"]);
    assert_eq!(s.messages("channel=wecom&kind=token").len(), 2);
}

#[test]
fn wecom_rate_limits_defer_the_batch_then_it_is_delivered() {
    let (p, s, d) = setup(|_| {});
    // 45033 (too many concurrent calls): a short wait, then the batch is sent again.
    s.faults(&json!([{
        "channel": "wecom", "match": {"endpoint": "send"},
        "action": "rate_limit", "code": 45033, "count": 1
    }]));
    let id = dispatch(&d, &trigger("busy", &["ZhangSan", "lisi"]));
    let status = d.wait_finished(&id);
    assert_eq!(status["delivered"], 2, "{status}");
    let got = sends(&s);
    let answers: Vec<&Value> = got.iter().map(|m| &m["answer"]["code"]).collect();
    assert_eq!(answers, [45033, 0], "{got:?}");
    let shown = show(&p, &id);
    assert!(
        shown.contains("45033 api concurrent out of limit"),
        "{shown}"
    );
    assert!(shown.contains("→ deferred"), "{shown}");
    assert!(shown.contains("→ delivered"), "{shown}");

    // 45009 (the API's frequency limit): the touchpoint waits for the next minute, new
    // triggers still accepted.
    s.faults(&json!([{"channel": "wecom", "action": "rate_limit", "count": 1}]));
    let limited = dispatch(&d, &trigger("limited", &["wangwu"]));
    let tps = d.wait_until("/v1/touchpoints", "wecom-stores never waited", |_, tps| {
        listed(tps)["state"] == "waiting"
    });
    let tp = listed(&tps);
    assert_eq!(tp["code"], "45009", "{tp}");
    assert!(
        tp["held"]
            .as_str()
            .is_some_and(|r| r.contains("45009 api freq out of limit: WeCom's rate limit")),
        "{tp}"
    );
    // Until the start of a minute (the wait is computed a moment before it is recorded).
    let until = tp["until"].as_str().unwrap();
    let seconds = &until[17..19];
    assert!(["00", "01"].contains(&seconds), "{until}");
    let (code, _) = post(&d, &trigger("while-waiting", &["zhaoliu"]));
    assert_eq!(code, 202);
    let shown = show(&p, &limited);
    assert!(shown.contains("→ deferred"), "{shown}");
}

#[test]
fn wecom_users_the_platform_refuses_fail_alone() {
    let (p, s, d) = setup(|_| {});
    s.faults(&json!([
        {"channel": "wecom", "action": "fail_users", "ids": ["LiSi"], "code": 40031},
        {"channel": "wecom", "action": "fail_users", "ids": ["wangwu"], "code": 701016},
    ]));
    let id = dispatch(&d, &trigger("some-fail", &["ZhangSan", "LiSi", "wangwu"]));
    let status = d.wait_finished(&id);
    assert_eq!(
        (&status["delivered"], &status["failed"]),
        (&json!(1), &json!(2)),
        "{status}"
    );
    let got = sends(&s);
    assert_eq!(got.len(), 1, "not sent again: {got:?}");
    assert_eq!(got[0]["delivered"], json!(["ZhangSan"]));
    let shown = show(&p, &id);
    assert!(
        shown.contains("recipients: 3 in all, 1 delivered, 2 failed, 0 remaining"),
        "{shown}"
    );
    assert!(
        shown.contains("u2: invaliduser: WeCom cannot reach this userid"),
        "{shown}"
    );
    assert!(
        shown.contains("u3: unlicenseduser: the member has no basic API licence"),
        "{shown}"
    );

    // Nobody left: 81013 fails them all, each with the code.
    s.faults(
        &json!([{"channel": "wecom", "action": "fail_users", "ids": ["zhaoliu"], "code": 40031}]),
    );
    let none = dispatch(&d, &trigger("all-fail", &["zhaoliu"]));
    let status = d.wait_finished(&none);
    assert_eq!(status["failed"], 1, "{status}");
    let shown = show(&p, &none);
    assert!(
        shown.contains("u1: 81013 user & party & tag all invalid"),
        "{shown}"
    );
}

#[test]
fn wecom_a_refused_secret_holds_the_touchpoint_until_a_fixed_one_is_applied() {
    let (p, s, d) = setup(|p| {
        p.write(SECRET_FILE, "not-the-app-secret\n");
    });
    let id = dispatch(&d, &trigger("held", &["ZhangSan", "lisi"]));
    let tps = d.wait_until(
        "/v1/touchpoints",
        "wecom-stores was never held",
        |_, tps| listed(tps)["state"] == "held",
    );
    let tp = listed(&tps);
    assert_eq!(tp["code"], "40001", "{tp}");
    let reason = tp["held"].as_str().unwrap();
    assert!(
        reason.contains(
            "40001 invalid credential: WeCom refused the `secret` of corp ww4f1e2d3c4b5a6978: point `secret` at the current Secret"
        ),
        "{reason}"
    );
    assert!(!reason.contains("not-the-app-secret"), "{reason}");
    // New triggers are refused while it is held; the batch is parked, not failed.
    let (code, body) = post(&d, &trigger("refused", &["wangwu"]));
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "touchpoint_held", "{body}");
    let shown = show(&p, &id);
    assert!(shown.contains("held: 40001 invalid credential"), "{shown}");
    assert!(sends(&s).is_empty());
    let log = d.log();
    assert!(!log.contains("not-the-app-secret"), "{log}");

    // The fixed secret, applied: released, and the parked batch delivered.
    let right = Project::with_samples().read(SECRET_FILE);
    p.write(SECRET_FILE, &right);
    p.run(&["apply", "--auto-approve"]).code(0);
    let status = d.wait_finished(&id);
    assert_eq!(status["delivered"], 2, "{status}");
    let got = sends(&s);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["delivered"], json!(["ZhangSan", "lisi"]));
    let (_, tps) = d.call("GET", "/v1/touchpoints", None);
    assert_eq!(listed(&tps)["state"], "ready", "{tps}");
}

#[test]
fn wecom_customers_get_one_mass_message_with_its_msgid_noted() {
    let (p, s, d) = setup(|p| {
        p.set(
            FILE,
            "message = \"news\"",
            "message = \"news\"\naudience = \"customers\"\nsender = \"zhangsan\"",
        )
        .set(
            FILE,
            "userid = \"user.wecom_userid\"",
            "external_userid = \"user.external_userid\"",
        );
    });
    s.faults(&json!([{"channel": "wecom", "action": "fail_users", "ids": ["wmB"], "code": 40096}]));
    let users = json!([
        {"user_id": "c1", "attributes": {"external_userid": "wmA"}},
        {"user_id": "c2", "attributes": {"external_userid": "wmB"}},
    ]);
    let mut t = trigger("customers", &[]);
    t["users"] = users;
    let id = dispatch(&d, &t);
    let status = d.wait_finished(&id);
    assert_eq!(
        (&status["delivered"], &status["failed"]),
        (&json!(1), &json!(1)),
        "{status}"
    );
    let got = sends(&s);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0]["endpoint"],
        "/cgi-bin/externalcontact/add_msg_template"
    );
    assert_eq!(
        got[0]["body"],
        json!({
            "chat_type": "single",
            "external_userid": ["wmA", "wmB"],
            "sender": "zhangsan",
            "attachments": [{"msgtype": "link", "link": {
                "title": "新品上架", "desc": "本周新品到店", "url": "https://m.example.com/new"
            }}]
        })
    );
    let shown = show(&p, &id);
    assert!(shown.contains("add_msg_template msgid msg"), "{shown}");
    assert!(shown.contains("c2: fail_list:"), "{shown}");
}

#[test]
fn wecom_plan_refresh_finds_the_agent_and_shows_a_refused_secret_without_it() {
    let p = Project::with_samples();
    let s = p.start_sandbox(&[]);
    p.set(FILE, "http://127.0.0.1:8641", &s.url);
    let right = p.read(SECRET_FILE);
    let plan = |p: &Project| p.run(&["plan", "--refresh", "--allow-private-network"]);
    let good = plan(&p);
    good.code(0);
    assert!(!good.stdout.contains("! wecom-stores"), "{}", good.all());
    // The probe asked for a token and for the agent, and sent nothing.
    assert_eq!(s.messages("channel=wecom&kind=query").len(), 1);
    assert!(sends(&s).is_empty());

    // An agent id that is not the app's.
    p.set(FILE, "agent_id = 1000005", "agent_id = 1000006");
    let wrong_agent = plan(&p);
    wrong_agent.code(0).stdout_has("! wecom-stores: ");
    assert!(
        wrong_agent.stdout.contains("40056"),
        "{}",
        wrong_agent.all()
    );
    p.set(FILE, "agent_id = 1000006", "agent_id = 1000005");

    p.write(SECRET_FILE, "not-the-app-secret\n");
    let bad = plan(&p);
    bad.code(0).stdout_has("! wecom-stores: ");
    assert!(bad.stdout.contains("40001"), "{}", bad.all());
    assert!(!bad.all().contains("not-the-app-secret"), "{}", bad.all());
    assert!(!bad.all().contains(right.trim()), "{}", bad.all());
    // The JSON plan carries it as a warning, and the exit code is the plan's own: with
    // --detailed-exitcode, 2 for the creates of an empty registry.
    let json = p.run(&[
        "plan",
        "--refresh",
        "--allow-private-network",
        "--format",
        "json",
        "--detailed-exitcode",
    ]);
    json.code(2);
    let doc: Value = serde_json::from_str(&json.stdout).unwrap();
    let warnings = doc["warnings"].as_array().expect("warnings");
    assert!(
        warnings.iter().any(|w| w["touchpoint"] == "wecom-stores"
            && w["message"].as_str().unwrap().contains("40001")),
        "{warnings:?}"
    );
}
