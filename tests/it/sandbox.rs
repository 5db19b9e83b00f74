//! `touchctl sandbox`, the real binary on the sample touchpoints: the platforms' answers (success
//! envelopes, error codes, statuses), the messages log, injected faults, the webhook sink's checks,
//! and wechatpy against it.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::daemon_support::SandboxProcess;
use crate::support::{Project, conformance};

const OA_APP: &str = "wx8a7c3e1f5b2d4690";
const OA_TEMPLATE: &str = "TM00015-kD3xq8Vb";
const CORP: &str = "ww4f1e2d3c4b5a6978";
const AGENT: u32 = 1000005;
const GETUI_APP: &str = "Kq3Lm8Np2Rs5Tv7Wx9Yz1";
const GETUI_KEY: &str = "Ab4Cd6Ef8Gh0Ij2Kl4Mn6";
const COMPONENT_APP: &str = "wx5f4e3d2c1b0a9f8e";
const SERVICE_APP: &str = "wx3c9d2e7f1a5b8c40";

/// A sample secret, as the sandbox reads it.
fn secret(p: &Project, name: &str) -> String {
    p.read(&format!("secrets/sandbox/{name}"))
        .trim()
        .to_string()
}

/// An answer: status, headers (names lowercased), JSON body (or `{"raw": text}`).
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Value,
}

/// One request with any headers; the body is sent without a Content-Type, as wechatpy sends it.
fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Answer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut req = reqwest::Client::new().request(method.parse().expect("method"), url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        Answer {
            status,
            headers,
            body,
        }
    })
}

fn get(url: &str) -> Answer {
    call("GET", url, &[], None)
}

fn post(url: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
    call(
        "POST",
        url,
        headers,
        Some(serde_json::to_vec(body).unwrap()),
    )
}

fn start() -> (Project, SandboxProcess) {
    let p = Project::with_samples();
    let s = p.start_sandbox(&[]);
    (p, s)
}

fn oa_token(s: &SandboxProcess, p: &Project) -> String {
    let a = get(&format!(
        "{}/cgi-bin/token?grant_type=client_credential&appid={OA_APP}&secret={}",
        s.url,
        secret(p, "oa_app_secret")
    ));
    a.body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {}", a.body))
        .to_string()
}

fn oa_send(s: &SandboxProcess, token: &str, body: &Value) -> Answer {
    post(
        &format!(
            "{}/cgi-bin/message/template/send?access_token={token}",
            s.url
        ),
        &[],
        body,
    )
}

fn wecom_token(s: &SandboxProcess, p: &Project, which: &str) -> Answer {
    get(&format!(
        "{}/cgi-bin/gettoken?corpid={CORP}&corpsecret={}",
        s.url,
        secret(p, which)
    ))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Getui's `auth` with a sign made here as the SDKs make it.
fn getui_auth(s: &SandboxProcess, p: &Project, master_secret: &str) -> Answer {
    use sha2::Digest;
    let ts = now_ms().to_string();
    let sign = hex::encode(sha2::Sha256::digest(
        format!("{GETUI_KEY}{ts}{master_secret}").as_bytes(),
    ));
    let _ = p;
    post(
        &format!("{}/v2/{GETUI_APP}/auth", s.url),
        &[("content-type", "application/json;charset=utf-8")],
        // The Java SDK sends the timestamp as a number.
        &json!({ "sign": sign, "timestamp": ts.parse::<u64>().unwrap(), "appkey": GETUI_KEY }),
    )
}

/// `xxxxxxxx-xxxxxxxx-xxxxxxxx`, the OA's request id in its errmsgs.
fn ends_with_rid(msg: &str) -> bool {
    msg.rsplit_once(" rid: ").is_some_and(|(_, rid)| {
        let parts: Vec<&str> = rid.split('-').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| p.len() == 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

#[test]
fn sandbox_prints_where_it_listens_and_each_account_it_serves() {
    let (_p, s) = start();
    let banner = s.banner_lines(9);
    let lines: Vec<&str> = banner.lines().collect();
    assert_eq!(
        lines[0],
        format!("touchctl sandbox: listening on {}", s.url)
    );
    for expected in [
        format!("serving wechat-oa (wechat_official_account, app id {OA_APP}, 2 template(s))"),
        format!(
            "serving open-platform (wechat_open_platform, component app id {COMPONENT_APP}, authorisation page {}/cgi-bin/componentloginpage, accounts it can authorise: wechat-service)",
            s.url
        ),
        format!(
            "serving wechat-service (wechat_official_account, app id {SERVICE_APP}, third-party through open-platform, 1 template(s))"
        ),
        format!("serving wecom-stores (wecom, corp id {CORP}, agent {AGENT}, customer contact)"),
        format!("serving app-push (app_push getui, app id {GETUI_APP})"),
        format!(
            "serving sms (custom, {}/_sandbox/webhooks/sms, Bearer token and signature checked)",
            s.url
        ),
        format!(
            "serving loyalty-points (custom, {}/_sandbox/webhooks/loyalty, Bearer token checked)",
            s.url
        ),
        "pushing no verify tickets until POST /_sandbox/tickets names a URL (or start with --push-tickets-to URL)".to_string(),
    ] {
        assert!(lines.contains(&expected.as_str()), "{expected}\n{banner}");
    }
    assert_eq!(lines.len(), 9, "{banner}");
    assert_eq!(s.terminate(), 0);
}

#[test]
fn sandbox_token_endpoints_answer_as_the_platforms_do() {
    let (p, s) = start();
    // OA: no errcode at all on success; its own content type.
    let a = get(&format!(
        "{}/cgi-bin/token?grant_type=client_credential&appid={OA_APP}&secret={}",
        s.url,
        secret(&p, "oa_app_secret")
    ));
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers["content-type"],
        "application/json; encoding=utf-8"
    );
    let keys: Vec<&String> = a.body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["access_token", "expires_in"], "{}", a.body);
    assert_eq!(a.body["expires_in"], 7200);
    assert!(a.body["access_token"].as_str().unwrap().len() >= 64);
    // Each call issues a new token.
    assert_ne!(oa_token(&s, &p), a.body["access_token"].as_str().unwrap());
    for (query, code) in [
        (
            format!("grant_type=client_credential&appid={OA_APP}&secret=wrong"),
            40125,
        ),
        (
            "grant_type=client_credential&appid=wx0000000000000000&secret=x".into(),
            40013,
        ),
        (
            format!("grant_type=client_credential&appid={OA_APP}"),
            41004,
        ),
        ("grant_type=client_credential&secret=x".into(), 41002),
        (
            format!("grant_type=password&appid={OA_APP}&secret=x"),
            40002,
        ),
    ] {
        let e = get(&format!("{}/cgi-bin/token?{query}", s.url));
        assert_eq!(
            (e.status, &e.body["errcode"]),
            (200, &json!(code)),
            "{query}: {}",
            e.body
        );
        assert!(
            ends_with_rid(e.body["errmsg"].as_str().unwrap()),
            "{}",
            e.body
        );
    }

    // WeCom: errcode 0 on gettoken, the same token while it is valid, one per secret.
    let app = wecom_token(&s, &p, "wecom_secret");
    assert_eq!(
        app.headers["content-type"],
        "application/json; charset=UTF-8"
    );
    assert_eq!(app.body["errcode"], 0, "{}", app.body);
    assert_eq!(app.body["errmsg"], "ok");
    assert_eq!(app.body["expires_in"], 7200);
    let again = wecom_token(&s, &p, "wecom_secret");
    assert_eq!(again.body["access_token"], app.body["access_token"]);
    let contact = wecom_token(&s, &p, "wecom_contact_secret");
    assert_ne!(contact.body["access_token"], app.body["access_token"]);
    let wrong = get(&format!(
        "{}/cgi-bin/gettoken?corpid={CORP}&corpsecret=wrong",
        s.url
    ));
    assert_eq!(wrong.body["errcode"], 40001, "{}", wrong.body);
    let msg = wrong.body["errmsg"].as_str().unwrap();
    assert!(msg.starts_with("invalid credential, hint: ["), "{msg}");
    assert!(
        msg.ends_with(
            ", from ip: 127.0.0.1, more info at https://open.work.weixin.qq.com/devtool/query?e=40001"
        ),
        "{msg}"
    );
    assert_eq!(wrong.headers["error-code"], "40001");
    let unknown = get(&format!(
        "{}/cgi-bin/gettoken?corpid=ww0000000000000000&corpsecret=x",
        s.url
    ));
    assert_eq!(unknown.body["errcode"], 40013);

    // Getui: code 0 with the token and a string expire_time a day ahead; a bad sign is a 400.
    let before = now_ms();
    let g = getui_auth(&s, &p, &secret(&p, "getui_master_secret"));
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.headers["content-type"], "application/json;charset=utf-8");
    assert_eq!(g.body["code"], 0);
    let expire: u128 = g.body["data"]["expire_time"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let day = 86_400_000;
    assert!(
        (before + day..=now_ms() + day).contains(&expire),
        "{expire}"
    );
    let bad = getui_auth(&s, &p, "not-the-master-secret");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body, json!({ "code": 20001, "msg": "sign is invalid" }));

    // Every token request is in the log, with the touchpoint its app id names.
    let tokens = s.messages("kind=token&channel=oa");
    assert_eq!(tokens.len(), 7);
    assert_eq!(tokens[2]["touchpoint"], "wechat-oa");
    assert_eq!(
        tokens[2]["answer"],
        json!({ "http_status": 200, "code": 40125 })
    );
    assert_eq!(tokens[3]["touchpoint"], Value::Null);
    let getui = s.messages("channel=getui");
    assert_eq!(getui.len(), 2);
    assert_eq!(
        getui[1]["answer"],
        json!({ "http_status": 400, "code": 20001 })
    );
}

#[test]
fn sandbox_oa_template_send_is_logged_and_a_repeated_client_msg_id_is_a_duplicate() {
    let (p, s) = start();
    let token = oa_token(&s, &p);
    let message = json!({
        "touser": "oUser1", "template_id": OA_TEMPLATE, "url": "https://m.example.com/orders",
        "client_msg_id": "dsp_1_0_u1",
        "data": { "first": { "value": "您的订单已发货" }, "keyword1": { "value": "SF1", "color": "#173177" } },
    });
    let sent = oa_send(&s, &token, &message);
    assert_eq!(sent.body["errcode"], 0, "{}", sent.body);
    assert_eq!(sent.body["errmsg"], "ok");
    let msgid = sent.body["msgid"].as_u64().expect("a numeric msgid");
    let again = oa_send(&s, &token, &message);
    assert_eq!(
        again.body,
        json!({ "errcode": 0, "errmsg": "ok", "msgid": msgid })
    );
    // Another client_msg_id is another message.
    let mut other = message.clone();
    other["client_msg_id"] = "dsp_1_0_u1_b".into();
    assert_ne!(oa_send(&s, &token, &other).body["msgid"], msgid);
    let mut bad = message.clone();
    bad["template_id"] = "TM-not-this-account".into();
    let e = oa_send(&s, &token, &bad);
    assert_eq!(e.body["errcode"], 40037);
    assert!(
        e.body["errmsg"]
            .as_str()
            .unwrap()
            .starts_with("invalid template_id rid: ")
    );
    assert_eq!(oa_send(&s, "not-a-token", &message).body["errcode"], 40001);
    // Bytes that are not JSON.
    let junk = call(
        "POST",
        &format!(
            "{}/cgi-bin/message/template/send?access_token={token}",
            s.url
        ),
        &[],
        Some(b"{not json".to_vec()),
    );
    assert_eq!(junk.body["errcode"], 47001);

    let log = s.messages("channel=oa&kind=message&touchpoint=wechat-oa");
    assert_eq!(log.len(), 5);
    let first = &log[0];
    assert_eq!(first["endpoint"], "/cgi-bin/message/template/send");
    assert_eq!(first["recipients"], json!(["oUser1"]));
    assert_eq!(first["delivered"], json!(["oUser1"]));
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["answer"], json!({ "http_status": 200, "code": 0 }));
    assert_eq!(first["body"], message);
    assert_eq!(log[1]["duplicate"], true);
    assert_eq!(log[1]["delivered"], json!([]));
    assert_eq!(log[3]["answer"]["code"], 40037);
    // The unknown token matched no account.
    let all = s.messages("channel=oa&kind=message");
    assert_eq!(all.len(), 6);
    assert_eq!(all[4]["touchpoint"], Value::Null);
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[test]
fn sandbox_wecom_fails_the_users_a_fault_names_in_invaliduser() {
    let (p, s) = start();
    let token = wecom_token(&s, &p, "wecom_secret").body["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{}/cgi-bin/message/send?access_token={token}", s.url);
    let message = |touser: &str| {
        json!({
            "touser": touser, "toparty": "", "totag": "", "msgtype": "news", "agentid": AGENT,
            "news": { "articles": [{ "title": "新品上架", "description": "d", "url": "https://m.example.com/new" }] },
        })
    };
    let active = s.faults(&json!([
        { "channel": "wecom", "match": { "touchpoint": "wecom-stores", "endpoint": "send" },
          "action": "fail_users", "ids": ["LiSi"], "code": 40031 },
        { "channel": "wecom", "action": "fail_users", "ids": ["wangwu"], "code": 701016 },
    ]));
    assert_eq!(active.as_array().unwrap().len(), 2, "{active}");
    let a = post(&url, &[], &message("zhangsan|LiSi|wangwu"));
    assert_eq!(a.body["errcode"], 0, "{}", a.body);
    assert_eq!(a.body["invaliduser"], "lisi", "ids come back lower-cased");
    assert_eq!(a.body["unlicenseduser"], "wangwu");
    assert_eq!(a.body["invalidparty"], "");
    assert!(a.body["msgid"].as_str().is_some_and(|m| !m.is_empty()));
    // Nobody left: 81013.
    let none = post(&url, &[], &message("LiSi"));
    assert_eq!(none.body["errcode"], 81013, "{}", none.body);
    assert!(
        none.body["errmsg"]
            .as_str()
            .unwrap()
            .starts_with("user & party & tag all invalid, hint: [")
    );
    // Another app's agentid, the contact secret's token, too many ids.
    let mut other = message("zhangsan");
    other["agentid"] = json!(AGENT + 1);
    assert_eq!(post(&url, &[], &other).body["errcode"], 40056);
    let ids: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    assert_eq!(
        post(&url, &[], &message(&ids.join("|"))).body["errcode"],
        40058
    );
    let mut text = message("zhangsan");
    text["msgtype"] = "text".into();
    assert_eq!(
        post(&url, &[], &text).body["errcode"],
        44004,
        "text without content"
    );

    let log = s.messages("channel=wecom&kind=message");
    assert_eq!(log[0]["recipients"], json!(["zhangsan", "LiSi", "wangwu"]));
    assert_eq!(log[0]["delivered"], json!(["zhangsan"]));
    assert_eq!(
        log[0]["failed"],
        json!([{ "id": "LiSi", "code": 40031 }, { "id": "wangwu", "code": 701016 }])
    );
    assert_eq!(log[1]["answer"]["code"], 81013);

    // Customers: only the contact secret's token may send them a template.
    let contact = wecom_token(&s, &p, "wecom_contact_secret").body["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let template = json!({ "external_userid": ["wmA", "wmB"], "text": { "content": "会员日" } });
    s.faults(&json!([{ "channel": "wecom", "action": "fail_users", "ids": ["wmB"] }]));
    let made = post(
        &format!(
            "{}/cgi-bin/externalcontact/add_msg_template?access_token={contact}",
            s.url
        ),
        &[],
        &template,
    );
    assert_eq!(made.body["errcode"], 0, "{}", made.body);
    assert_eq!(made.body["fail_list"], json!(["wmB"]));
    assert!(
        made.body["msgid"]
            .as_str()
            .is_some_and(|m| m.starts_with("msg"))
    );
    let forbidden = post(
        &format!(
            "{}/cgi-bin/externalcontact/add_msg_template?access_token={token}",
            s.url
        ),
        &[],
        &template,
    );
    assert_eq!(forbidden.body["errcode"], 48002);
    assert!(
        forbidden.body["errmsg"]
            .as_str()
            .unwrap()
            .starts_with("api forbidden, hint: [")
    );
}

#[test]
fn sandbox_getui_auth_list_message_and_list_cid() {
    let (p, s) = start();
    let g = getui_auth(&s, &p, &secret(&p, "getui_master_secret"));
    let token = g.body["data"]["token"].as_str().unwrap().to_string();
    let base = format!("{}/v2/{GETUI_APP}", s.url);
    let headers = [
        ("token", token.as_str()),
        ("content-type", "application/json;charset=utf-8"),
    ];
    let message = json!({
        "request_id": "dsp_42_0_attempt",
        "settings": { "ttl": 86_400_000 },
        "push_message": { "notification": { "title": "会员专享", "body": "满100减20", "click_type": "startapp" } },
    });
    let m = post(&format!("{base}/push/list/message"), &headers, &message);
    assert_eq!((m.status, &m.body["code"]), (200, &json!(0)), "{}", m.body);
    let taskid = m.body["data"]["taskid"].as_str().unwrap().to_string();
    assert!(taskid.starts_with("RASL_"), "{taskid}");
    // The same request_id again: the first taskid.
    let again = post(&format!("{base}/push/list/message"), &headers, &message);
    assert_eq!(again.body["data"]["taskid"], taskid.as_str());
    let mut short = message.clone();
    short["request_id"] = "short".into();
    let bad = post(&format!("{base}/push/list/message"), &headers, &short);
    assert_eq!(
        (bad.status, &bad.body),
        (
            400,
            &json!({ "code": 20001, "msg": "request_id is invalid" })
        )
    );

    s.faults(&json!([{ "channel": "getui", "action": "fail_users", "ids": ["cid-2"] }]));
    let push = |cids: &[&str]| {
        post(
            &format!("{base}/push/list/cid"),
            &headers,
            &json!({ "audience": { "cid": cids }, "taskid": taskid, "is_async": false }),
        )
    };
    let c = push(&["cid-1", "cid-2", "cid-3"]);
    assert_eq!(c.status, 200, "{}", c.body);
    let statuses = &c.body["data"][&taskid];
    assert_eq!(statuses["cid-2"], "target user is invalid");
    for cid in ["cid-1", "cid-3"] {
        let st = statuses[cid].as_str().unwrap();
        assert!(
            st == "successed_online" || st == "successed_offline",
            "{st}"
        );
    }
    let repeat = push(&["cid-1"]);
    assert_eq!(repeat.body["data"][&taskid]["cid-1"], statuses["cid-1"]);
    let many: Vec<String> = (0..1001).map(|i| format!("c{i}")).collect();
    let over = post(
        &format!("{base}/push/list/cid"),
        &headers,
        &json!({ "audience": { "cid": many }, "taskid": taskid }),
    );
    assert_eq!(
        (over.status, &over.body["msg"]),
        (400, &json!("cid size over limit"))
    );
    let no_token = post(&format!("{base}/push/list/cid"), &[], &json!({}));
    assert_eq!(
        (no_token.status, &no_token.body["code"]),
        (401, &json!(10001))
    );

    let log = s.messages("channel=getui&kind=message&touchpoint=app-push");
    assert_eq!(log[1]["duplicate"], true, "{:?}", log[1]);
    let cids = log
        .iter()
        .find(|e| e["endpoint"] == format!("/v2/{GETUI_APP}/push/list/cid"))
        .unwrap();
    assert_eq!(cids["recipients"], json!(["cid-1", "cid-2", "cid-3"]));
    assert_eq!(cids["delivered"], json!(["cid-1", "cid-3"]));
    assert_eq!(cids["failed"], json!([{ "id": "cid-2", "code": 20001 }]));
    assert_eq!(cids["duplicate"], false);
    let repeated = &log[log.iter().position(|e| e == cids).unwrap() + 1];
    assert_eq!(
        (repeated["duplicate"].clone(), repeated["delivered"].clone()),
        (json!(true), json!([]))
    );
}

#[test]
fn sandbox_expire_tokens_and_rate_limit_faults() {
    let (p, s) = start();
    let token = oa_token(&s, &p);
    let message = json!({ "touser": "oUser1", "template_id": OA_TEMPLATE, "data": {} });
    assert_eq!(oa_send(&s, &token, &message).body["errcode"], 0);
    let active = s.faults(&json!([{ "channel": "oa", "action": "expire_tokens" }]));
    assert_eq!(
        active,
        json!([]),
        "expire_tokens acts at once and is not kept"
    );
    let expired = oa_send(&s, &token, &message);
    assert_eq!(expired.body["errcode"], 42001, "{}", expired.body);
    assert!(
        expired.body["errmsg"]
            .as_str()
            .unwrap()
            .starts_with("access_token expired rid: ")
    );
    // A token issued after it works.
    let fresh = oa_token(&s, &p);
    assert_eq!(oa_send(&s, &fresh, &message).body["errcode"], 0);

    // Getui's token expires too: 401 10001.
    let g = getui_auth(&s, &p, &secret(&p, "getui_master_secret"));
    let gt = g.body["data"]["token"].as_str().unwrap().to_string();
    s.faults(&json!([{ "channel": "getui", "match": { "touchpoint": "app-push" }, "action": "expire_tokens" }]));
    let m = post(
        &format!("{}/v2/{GETUI_APP}/push/list/message", s.url),
        &[("token", &gt)],
        &json!({ "request_id": "0123456789", "push_message": { "transmission": "x" } }),
    );
    assert_eq!((m.status, &m.body["code"]), (401, &json!(10001)));

    // Two requests rate-limited, then served again.
    let active = s.faults(&json!([{ "channel": "oa", "match": { "endpoint": "send" }, "action": "rate_limit", "code": 45011, "count": 2 }]));
    assert_eq!(active[0]["count"], 2);
    for _ in 0..2 {
        let limited = oa_send(&s, &fresh, &message);
        assert_eq!(limited.body["errcode"], 45011, "{}", limited.body);
    }
    assert_eq!(oa_send(&s, &fresh, &message).body["errcode"], 0);
    // The token endpoint was not matched by it.
    oa_token(&s, &p);
    s.faults(&json!([{ "channel": "getui", "action": "rate_limit", "code": 30015, "count": 1 }]));
    let g2 = getui_auth(&s, &p, &secret(&p, "getui_master_secret"));
    assert_eq!((g2.status, &g2.body["code"]), (403, &json!(30015)));
    // An error with an HTTP status, and clearing.
    s.faults(&json!([{ "channel": "oa", "action": "error", "http_status": 503 }]));
    let down = oa_send(&s, &fresh, &message);
    assert_eq!(down.status, 503);
    let (code, cleared) =
        crate::daemon_support::http("DELETE", &format!("{}/_sandbox/faults", s.url), None, None);
    assert_eq!((code, cleared), (200, json!([])));
    assert_eq!(oa_send(&s, &fresh, &message).body["errcode"], 0);
    let log = s.messages("channel=oa&kind=message");
    let codes: Vec<Value> = log.iter().map(|e| e["answer"]["code"].clone()).collect();
    assert_eq!(
        codes,
        [
            json!(0),
            json!(42001),
            json!(0),
            json!(45011),
            json!(45011),
            json!(0),
            Value::Null,
            json!(0)
        ]
    );
    assert_eq!(log[6]["answer"]["http_status"], 503);
}

#[test]
fn sandbox_bad_fault_rules_are_refused_naming_the_problem() {
    let (_p, s) = start();
    for (rules, problem) in [
        (
            json!([{ "channel": "oa", "action": "explode" }]),
            "unknown action `explode`",
        ),
        (
            json!([{ "channel": "wecom", "action": "rate_limit", "code": 45011 }]),
            "45009 or 45033",
        ),
        (
            json!([{ "channel": "oa", "match": { "touchpoint": "nope" }, "action": "expire_tokens" }]),
            "no oa touchpoint `nope`",
        ),
        (json!({ "not": "a rule" }), "`channel` is missing"),
    ] {
        let a = post(&format!("{}/_sandbox/faults", s.url), &[], &rules);
        assert_eq!(a.status, 400, "{rules}");
        let e = a.body["error"].as_str().unwrap();
        assert!(e.contains(problem), "{e}");
        assert!(
            e.contains("Valid actions: expire_tokens; rate_limit"),
            "{e}"
        );
    }
    assert_eq!(get(&format!("{}/_sandbox/faults", s.url)).body, json!([]));
    let unknown = get(&format!("{}/cgi-bin/menu/get", s.url));
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.body["error"]
            .as_str()
            .unwrap()
            .contains("GET /cgi-bin/menu/get")
    );
    let filter = get(&format!("{}/_sandbox/messages?channel=sms", s.url));
    assert_eq!(filter.status, 400);
}

/// Signs a webhook with Python's `standardwebhooks`, the reference library: (id, timestamp, signature).
fn reference_signature(secret: &str, id: &str, body: &str) -> (String, String, String) {
    let script = r#"
import datetime, sys, time
from standardwebhooks.webhooks import Webhook
ts = int(time.time())
sig = Webhook(sys.argv[1]).sign(sys.argv[2], datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc), sys.argv[3])
print(ts)
print(sig)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, secret, id, body])
        .output()
        .expect("python3 (the reference library is Python's `standardwebhooks`)");
    assert!(
        out.status.success(),
        "standardwebhooks did not sign (pip install standardwebhooks; .ci/run does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let ts = lines.next().unwrap_or_default().to_string();
    let sig = lines.next().unwrap_or_default().to_string();
    (id.to_string(), ts, sig)
}

#[test]
fn sandbox_sink_checks_the_bearer_token_and_the_reference_signature() {
    let (p, s) = start();
    let url = format!("{}/_sandbox/webhooks/sms", s.url);
    let token = secret(&p, "sms_auth_token");
    let bearer = format!("Bearer {token}");
    let body = json!({ "type": "touchpoint.dispatch", "touchpoint": "sms", "campaign": "c", "dispatch_id": "dsp_1",
        "batch": { "index": 0, "count": 1 }, "template": { "text": "hi" },
        "recipients": [{ "user_id": "u1", "phone": "1" }, { "user_id": "u2", "phone": "2" }] })
    .to_string();
    let (id, ts, sig) = reference_signature(&secret(&p, "sms_signing_secret"), "dsp_1_0", &body);
    let send = |auth: &str, sig: &str, body: &str| {
        call(
            "POST",
            &url,
            &[
                ("authorization", auth),
                ("webhook-id", &id),
                ("webhook-timestamp", &ts),
                ("webhook-signature", sig),
                ("content-type", "application/json"),
            ],
            Some(body.as_bytes().to_vec()),
        )
    };
    let ok = send(&bearer, &sig, &body);
    assert_eq!((ok.status, &ok.body), (200, &json!({})), "{}", ok.body);
    let bad_token = send("Bearer not-the-token", &sig, &body);
    assert_eq!(bad_token.status, 401);
    assert!(
        bad_token.body["error"]
            .as_str()
            .unwrap()
            .contains("auth_token")
    );
    let tampered = send(&bearer, &sig, &body.replace("hi", "ho"));
    assert_eq!(tampered.status, 401);
    assert!(
        tampered.body["error"]
            .as_str()
            .unwrap()
            .contains("does not verify")
    );
    // The same webhook-id again is a duplicate, acknowledged.
    assert_eq!(send(&bearer, &sig, &body).status, 200);

    // A sink without a signing secret; a fault fails one recipient for good.
    s.faults(&json!([{ "channel": "custom", "match": { "touchpoint": "loyalty-points" }, "action": "fail_users", "ids": ["u2"], "code": 404 }]));
    let loyalty = call(
        "POST",
        &format!("{}/_sandbox/webhooks/loyalty", s.url),
        &[(
            "authorization",
            &format!("Bearer {}", secret(&p, "points_auth_token")),
        )],
        Some(body.as_bytes().to_vec()),
    );
    assert_eq!(
        loyalty.body,
        json!({ "failed": [{ "user_id": "u2", "reason": "code 404", "retry": false }] })
    );
    let unknown = call(
        "POST",
        &format!("{}/_sandbox/webhooks/nope", s.url),
        &[],
        Some(b"{}".to_vec()),
    );
    assert_eq!(unknown.status, 404);

    let log = s.messages("channel=custom");
    let answers: Vec<(Value, Value)> = log
        .iter()
        .map(|e| (e["answer"]["http_status"].clone(), e["duplicate"].clone()))
        .collect();
    assert_eq!(
        answers,
        [
            (json!(200), json!(false)),
            (json!(401), json!(false)),
            (json!(401), json!(false)),
            (json!(200), json!(true)),
            (json!(200), json!(false)),
            (json!(404), json!(false)),
        ]
    );
    assert_eq!(log[0]["touchpoint"], "sms");
    assert_eq!(log[0]["delivered"], json!(["u1", "u2"]));
    assert_eq!(log[4]["failed"], json!([{ "id": "u2", "code": 404 }]));
    assert_eq!(log[5]["touchpoint"], Value::Null);
}

#[test]
fn sandbox_token_ttl_shortens_every_lifetime() {
    let p = Project::with_samples();
    let s = p.start_sandbox(&["--token-ttl", "90s"]);
    let oa = get(&format!(
        "{}/cgi-bin/token?grant_type=client_credential&appid={OA_APP}&secret={}",
        s.url,
        secret(&p, "oa_app_secret")
    ));
    assert_eq!(oa.body["expires_in"], 90);
    assert_eq!(wecom_token(&s, &p, "wecom_secret").body["expires_in"], 90);
    let before = now_ms();
    let g = getui_auth(&s, &p, &secret(&p, "getui_master_secret"));
    let expire: u128 = g.body["data"]["expire_time"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (before + 90_000..=now_ms() + 90_000).contains(&expire),
        "{expire}"
    );
}

#[test]
fn sandbox_bodies_over_16_mib_are_refused() {
    let (_p, s) = start();
    let big = vec![b' '; 16 * 1024 * 1024 + 1];
    let a = call(
        "POST",
        &format!("{}/cgi-bin/message/template/send?access_token=x", s.url),
        &[],
        Some(big),
    );
    assert_eq!(a.status, 413);
    assert!(a.body["error"].as_str().unwrap().contains("16777216 bytes"));
    assert_eq!(s.messages("channel=oa")[0]["answer"]["http_status"], 413);
}

#[test]
fn sandbox_refuses_a_remote_listen_address_and_a_tree_with_errors() {
    let p = Project::with_samples();
    let r = p.run(&["sandbox", "--listen", "0.0.0.0:0"]);
    r.code(1)
        .stderr_has("is not a loopback address")
        .stderr_has("--allow-remote");
    p.write("touchpoints/broken.toml", "id = \"Bad Id\"\n");
    let r = p.run(&["sandbox", "--listen", "127.0.0.1:0"]);
    r.code(1).stderr_has("the sandbox did not start");
    assert!(r.stdout.contains("broken.toml"), "{}", r.stdout);
}

#[test]
fn sandbox_leaves_out_a_touchpoint_whose_secret_cannot_be_read() {
    let p = Project::with_samples();
    p.remove("secrets/sandbox/getui_master_secret");
    let s = p.start_sandbox(&[]);
    let banner = s.banner_lines(5);
    assert!(!banner.contains("app-push"), "{banner}");
    assert!(banner.contains("serving wechat-oa"), "{banner}");
    let warning = "warning: app-push: cannot read its secret `master_secret`";
    let deadline = std::time::Instant::now() + crate::daemon_support::PATIENCE;
    while !s.stderr().contains(warning) {
        assert!(std::time::Instant::now() < deadline, "{}", s.stderr());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn wechatpy_gets_the_answers_it_expects_from_the_sandbox() {
    let (p, s) = start();
    let Some(run) = conformance(
        "wechatpy_gets_the_answers_it_expects_from_the_sandbox",
        "wechatpy_check.py",
        &[
            s.url.as_str(),
            OA_APP,
            &secret(&p, "oa_app_secret"),
            OA_TEMPLATE,
            CORP,
            &secret(&p, "wecom_secret"),
            &AGENT.to_string(),
            &secret(&p, "wecom_contact_secret"),
        ],
    ) else {
        return;
    };
    run.code(0).stdout_has("all checks passed");
}
