//! `touchctl sandbox` playing the WeChat open platform, the real binary: encrypted ticket pushes
//! to a local receiver (opened with touchctl's own crypto), the component token, the authorisation
//! page and its authorise link, the authorisation, authorizer tokens the OA endpoints take, the
//! faults (grant_only, revoke, expire_ticket, expire_tokens), and wechatpy's `WeChatComponent`
//! driving all of it unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use touchctl::channel::open_platform::crypt::MsgCrypt;
use touchctl::channel::open_platform::event::{self, Event};

use crate::daemon_support::{PATIENCE, SandboxProcess, http, serve_on_loopback};
use crate::support::{Project, conformance};

const PLATFORM: &str = "open-platform";
const COMPONENT: &str = "wx5e6f7a8b9c0d1e2f";
const SECRET: &str = "op-component-secret-7f3a";
const TOKEN: &str = "opMessageToken42";
const KEY: &str = "Q2f8ZkLm3Np7Rt1Vx5Bz9Cd4Gh6Jk0Ms2Pw8Ty3Ua7E";
const OA: &str = "wx2b3c4d5e6f708192";
const OTHER_OA: &str = "wx3c4d5e6f70819203";
const TEMPLATE: &str = "TM00015-kD3xq8Vb";
const MINI: &str = "wx1d2e3f4a5b6c7d8e";
const REDIRECT: &str = "http://127.0.0.1:9/wechat/platforms/open-platform/authorized?state=b-1";

/// A project with an open platform, two Official Accounts in third-party mode naming it, and a
/// direct one (the samples'), with `key` as the platform's EncodingAESKey. The samples' own open
/// platform and the account bound through it are left out: this platform is the only one.
fn project(key: &str) -> Project {
    let p = Project::with_samples();
    p.remove("touchpoints/channels/open-platform.toml")
        .remove("touchpoints/channels/wechat-service.toml");
    p.write("secrets/op/secret", SECRET)
        .write("secrets/op/token", TOKEN)
        .write("secrets/op/aes_key", key)
        .write(
            "touchpoints/open-platform.toml",
            &format!(
                r#"id = "{PLATFORM}"
name = "营销开放平台 <&>"
kind = "wechat_open_platform"
category = "other"
component_app_id = "{COMPONENT}"
component_secret = {{ file = "../secrets/op/secret" }}
token = {{ file = "../secrets/op/token" }}
encoding_aes_key = {{ file = "../secrets/op/aes_key" }}
"#
            ),
        );
    for (id, app_id) in [("brand-oa", OA), ("other-oa", OTHER_OA)] {
        p.write(
            &format!("touchpoints/{id}.toml"),
            &format!(
                r#"id = "{id}"
name = "品牌公众号 {id}"
kind = "wechat_official_account"
category = "notification"
app_id = "{app_id}"
linked_mini_programs = ["{MINI}"]

[auth]
mode = "third_party"
platform = "{PLATFORM}"
authorizer_refresh_token = {{ file = "../secrets/op/{id}_refresh_token" }}

[dynamic_params]
openid = "user.wechat_openid"

[[templates]]
id = "order_shipped"
template_id = "{TEMPLATE}"
fields = ["first"]
"#
            ),
        );
    }
    p
}

fn crypt() -> MsgCrypt {
    MsgCrypt::new(TOKEN, KEY, COMPONENT).expect("the test key")
}

/// One push the receiver got.
#[derive(Clone, Debug)]
struct Pushed {
    path: String,
    query: HashMap<String, String>,
    body: Vec<u8>,
}

impl Pushed {
    /// The push opened with the platform's crypto, as the daemon opens it.
    fn open(&self) -> Event {
        let q = |k: &str| self.query.get(k).map(String::as_str).unwrap_or_default();
        assert_eq!(q("encrypt_type"), "aes");
        let xml = crypt()
            .open(&self.body, q("msg_signature"), q("timestamp"), q("nonce"))
            .expect("the push opens with the platform's token and key");
        // The plain signature: sha1 of the sorted token, timestamp and nonce.
        use sha1::Digest;
        let mut parts = [TOKEN, q("timestamp"), q("nonce")];
        parts.sort_unstable();
        assert_eq!(
            q("signature"),
            hex::encode(sha1::Sha1::digest(parts.concat().as_bytes()))
        );
        event::parse(&xml, COMPONENT).expect("an event")
    }
}

/// A local HTTP server standing in for the daemon's event URL: records every request, answers
/// `success` (or what `answer` holds).
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Pushed>>>,
    answer: Arc<Mutex<String>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Receiver {
    fn start() -> Self {
        let got = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new("success".to_string()));
        let (g, a) = (got.clone(), answer.clone());
        let app =
            axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
                let (g, a) = (g.clone(), a.clone());
                async move {
                    let query =
                        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                            .into_owned()
                            .collect();
                    g.lock().unwrap().push(Pushed {
                        path: uri.path().to_string(),
                        query,
                        body: body.to_vec(),
                    });
                    a.lock().unwrap().clone()
                }
            });
        let (base, stop) = serve_on_loopback(app);
        Self {
            url: format!("{base}/wechat/platforms/{{platform}}/events"),
            got,
            answer,
            _stop: stop,
        }
    }

    /// Waits for a push that opens to an event `pick` accepts; returns that event.
    fn wait_for<T>(&self, what: &str, pick: impl Fn(Event) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let got = self.got.lock().unwrap().clone();
            for p in got {
                assert_eq!(p.path, format!("/wechat/platforms/{PLATFORM}/events"));
                if let Some(t) = pick(p.open()) {
                    return t;
                }
            }
            assert!(Instant::now() < deadline, "no {what} was pushed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

/// The ticket of a verify-ticket event.
fn ticket(e: Event) -> Option<String> {
    match e {
        Event::VerifyTicket { ticket, .. } => Some(ticket),
        _ => None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A POST with a JSON body and no Content-Type (as wechatpy sends it); the answer must be 200.
fn post(url: &str, body: &Value) -> Value {
    let body = serde_json::to_vec(body).unwrap();
    let (status, text) = runtime().block_on(async {
        let resp = reqwest::Client::new()
            .post(url)
            .body(body)
            .send()
            .await
            .expect("request");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    });
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    assert_eq!(status, 200, "{url}: {v}");
    v
}

/// A GET that does not follow redirects: status, Location, body text.
fn get_raw(url: &str) -> (u16, Option<String>, String) {
    runtime().block_on(async {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let resp = client.get(url).send().await.expect("request");
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, location, resp.text().await.unwrap_or_default())
    })
}

/// Pushes a ticket now to `r`; returns it.
fn push_ticket(s: &SandboxProcess, r: &Receiver) -> String {
    let before = r.count();
    let v = post(
        &format!("{}/_sandbox/tickets", s.url),
        &json!({ "to": r.url }),
    );
    assert_eq!(
        v,
        json!({ "pushed": [{ "platform": PLATFORM, "status": "success" }] })
    );
    assert_eq!(r.count(), before + 1);
    let last = r.got.lock().unwrap().last().cloned().expect("a push");
    ticket(last.open()).expect("a verify ticket")
}

fn component_token_answer(s: &SandboxProcess, secret: &str, ticket: &str) -> Value {
    post(
        &format!("{}/cgi-bin/component/api_component_token", s.url),
        &json!({
            "component_appid": COMPONENT,
            "component_appsecret": secret,
            "component_verify_ticket": ticket,
        }),
    )
}

fn component_token(s: &SandboxProcess, ticket: &str) -> String {
    let v = component_token_answer(s, SECRET, ticket);
    v["component_access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no component token: {v}"))
        .to_string()
}

/// A component call with the token as `?access_token=` (the newer docs' name).
fn component(s: &SandboxProcess, api: &str, token: &str, body: &Value) -> Value {
    post(
        &format!("{}/cgi-bin/component/{api}?access_token={token}", s.url),
        body,
    )
}

fn pre_auth_code(s: &SandboxProcess, token: &str) -> String {
    let v = component(
        s,
        "api_create_preauthcode",
        token,
        &json!({ "component_appid": COMPONENT }),
    );
    assert_eq!(v["expires_in"], 1800, "{v}");
    v["pre_auth_code"]
        .as_str()
        .expect("pre_auth_code")
        .to_string()
}

/// The authorisation page's URL for a pre-auth code, with extra parameters.
fn page_url(s: &SandboxProcess, path: &str, code: &str, extra: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("component_appid", COMPONENT)
        .append_pair("pre_auth_code", code)
        .append_pair("redirect_uri", REDIRECT);
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    format!("{}{path}?{}", s.url, q.finish())
}

/// The href of the page's authorise link for `app_id`, made absolute.
fn authorise_link(s: &SandboxProcess, html: &str, app_id: &str) -> String {
    let marker = format!("id=\"authorise-{app_id}\" href=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no authorise link for {app_id}: {html}"))
        + marker.len();
    let href = &html[start..start + html[start..].find('"').expect("end of href")];
    format!("{}{}", s.url, href.replace("&amp;", "&"))
}

/// Opens the page, follows `app_id`'s authorise link; returns the auth code of the redirect.
fn authorise(s: &SandboxProcess, code: &str, app_id: &str, extra: &[(&str, &str)]) -> String {
    let (status, _, html) = get_raw(&page_url(s, "/cgi-bin/componentloginpage", code, extra));
    assert_eq!(status, 200, "{html}");
    let (status, location, body) = get_raw(&authorise_link(s, &html, app_id));
    assert_eq!(status, 302, "{body}");
    let location = url::Url::parse(&location.expect("a Location")).expect("a URL");
    let q: HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(
        q.get("state").map(String::as_str),
        Some("b-1"),
        "{location}"
    );
    assert_eq!(q.get("expires_in").map(String::as_str), Some("600"));
    q.get("auth_code").expect("auth_code").clone()
}

fn query_auth(s: &SandboxProcess, token: &str, auth_code: &str) -> Value {
    component(
        s,
        "api_query_auth",
        token,
        &json!({ "component_appid": COMPONENT, "authorization_code": auth_code }),
    )
}

fn granted(func_info: &Value) -> Vec<u64> {
    func_info
        .as_array()
        .expect("func_info")
        .iter()
        .map(|f| f["funcscope_category"]["id"].as_u64().expect("an id"))
        .collect()
}

fn template_send(s: &SandboxProcess, token: &str) -> Value {
    post(
        &format!(
            "{}/cgi-bin/message/template/send?access_token={token}",
            s.url
        ),
        &json!({ "touser": "o-user-1", "template_id": TEMPLATE, "data": { "first": { "value": "hi" } } }),
    )
}

fn start(p: &Project) -> (SandboxProcess, Receiver) {
    let r = Receiver::start();
    let s = p.start_sandbox(&["--push-tickets-to", &r.url]);
    (s, r)
}

#[test]
fn sandbox_pushes_sealed_tickets_and_the_component_token_needs_one() {
    let p = project(KEY);
    let (s, r) = start(&p);
    let banner = s.banner_lines(6);
    assert!(
        banner.contains(&format!(
            "serving {PLATFORM} (wechat_open_platform, component app id {COMPONENT}"
        )),
        "{banner}"
    );
    assert!(
        banner.contains("accounts it can authorise: brand-oa, other-oa"),
        "{banner}"
    );
    assert!(banner.contains("serving brand-oa (wechat_official_account, app id wx2b3c4d5e6f708192, third-party through open-platform"), "{banner}");
    assert!(banner.contains("pushing verify tickets to"), "{banner}");

    // The first push comes right at start.
    let first = r.wait_for("verify ticket", ticket);
    assert!(first.starts_with("ticket@@@"), "{first}");
    let token = component_token(&s, &first);
    assert!(!token.is_empty());

    let code = |v: Value| v["errcode"].as_i64().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(code(component_token_answer(&s, "wrong", &first)), 40125);
    assert_eq!(
        code(component_token_answer(&s, SECRET, "ticket@@@never")),
        61006
    );
    let unknown = post(
        &format!("{}/cgi-bin/component/api_component_token", s.url),
        &json!({ "component_appid": "wx0000000000000000", "component_appsecret": SECRET, "component_verify_ticket": first }),
    );
    assert_eq!(code(unknown), 61011);

    // expire_ticket: 61005 until the next push, whose ticket works; the earlier ones stay expired.
    s.faults(&json!([{ "channel": "open_platform", "action": "expire_ticket" }]));
    assert_eq!(code(component_token_answer(&s, SECRET, &first)), 61005);
    let next = push_ticket(&s, &r);
    assert_ne!(next, first);
    component_token(&s, &next);
    assert_eq!(code(component_token_answer(&s, SECRET, &first)), 61005);
    // A push the receiver refused does not lock the component out: the earlier ticket still works.
    *r.answer.lock().unwrap() = "fail".into();
    let v = post(&format!("{}/_sandbox/tickets", s.url), &json!({}));
    assert_eq!(
        v["pushed"][0]["status"]
            .as_str()
            .map(|t| t.contains("where `success` was expected")),
        Some(true),
        "{v}"
    );
    component_token(&s, &next);

    // The log has the component calls, their secrets masked.
    let log = s.messages("channel=open_platform&kind=token");
    assert!(log.len() >= 6, "{log:?}");
    let text = serde_json::to_string(&log).unwrap();
    for secret in [SECRET, first.as_str(), next.as_str()] {
        assert!(!text.contains(secret), "a secret in the log: {text}");
    }
    assert_eq!(log[0]["touchpoint"], PLATFORM, "{}", log[0]);
    assert_eq!(log[0]["body"]["component_appsecret"], "<redacted>");

    // A component token is not an OA token, and the sandbox says where the push failed.
    let v = template_send(&s, &token);
    assert_eq!(v["errcode"], 40001, "{v}");
    let deadline = Instant::now() + PATIENCE;
    while !s
        .stderr()
        .contains("push for open-platform to http://127.0.0.1:")
    {
        assert!(Instant::now() < deadline, "{}", s.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sandbox_authorises_an_account_on_its_page_and_its_authorizer_token_sends() {
    let p = project(KEY);
    // No push URL at start: the first POST /_sandbox/tickets names it.
    let s = p.start_sandbox(&[]);
    let r = Receiver::start();
    let token = component_token(&s, &push_ticket(&s, &r));
    let code = pre_auth_code(&s, &token);

    // The page: title, the platform's name escaped, the eight sets by label, both accounts.
    let (status, _, html) = get_raw(&page_url(
        &s,
        "/cgi-bin/componentloginpage",
        &code,
        &[("auth_type", "1")],
    ));
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("<title>授权 — touchctl sandbox</title>"),
        "{html}"
    );
    assert!(html.contains("营销开放平台 &lt;&amp;&gt;"), "{html}");
    for label in [
        "消息管理",
        "用户管理",
        "帐号服务",
        "网页服务",
        "群发与通知",
        "素材管理",
        "自定义菜单",
        "开放平台帐号管理",
    ] {
        assert!(html.contains(label), "{label}: {html}");
    }
    assert!(html.contains(&format!("id=\"authorise-{OA}\"")), "{html}");
    assert!(
        html.contains(&format!("id=\"authorise-{OTHER_OA}\"")),
        "{html}"
    );
    // biz_appid narrows it to one account, on the mobile paths too.
    for path in ["/safe/bindcomponent", "/wxaopen/safe/bindcomponent"] {
        let (status, _, html) = get_raw(&page_url(
            &s,
            path,
            &code,
            &[
                ("action", "bindcomponent"),
                ("no_scan", "1"),
                ("biz_appid", OA),
            ],
        ));
        assert_eq!(status, 200, "{html}");
        assert!(html.contains(&format!("id=\"authorise-{OA}\"")), "{html}");
        assert!(
            !html.contains(&format!("id=\"authorise-{OTHER_OA}\"")),
            "{html}"
        );
    }

    let auth_code = authorise(&s, &code, OA, &[]);
    // The authorized event reaches the push URL with the same code.
    let pushed = r.wait_for("authorized event", |e| match e {
        Event::Authorized {
            authorizer_app_id,
            auth_code,
            pre_auth_code,
            ..
        } => Some((authorizer_app_id, auth_code, pre_auth_code)),
        _ => None,
    });
    assert_eq!(
        pushed,
        (OA.to_string(), auth_code.clone(), Some(code.clone()))
    );
    // The link is single use: WeChat says it expired.
    let (status, _, html) = get_raw(&page_url(&s, "/cgi-bin/componentloginpage", &code, &[]));
    assert_eq!(status, 410, "{html}");
    assert!(html.contains("授权链接已过期"), "{html}");

    let v = query_auth(&s, &token, &auth_code);
    let info = &v["authorization_info"];
    assert_eq!(info["authorizer_appid"], OA, "{v}");
    assert_eq!(granted(&info["func_info"]), [1, 2, 3, 4, 7, 11, 15, 24]);
    let refresh = info["authorizer_refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string();
    let authorizer = info["authorizer_access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_eq!(
        query_auth(&s, &token, &auth_code)["errcode"],
        61009,
        "single use"
    );

    // The authorizer token sends a template message as the OA.
    let v = template_send(&s, &authorizer);
    assert_eq!(v["errcode"], 0, "{v}");
    let sent = s.messages("channel=oa&touchpoint=brand-oa");
    assert_eq!(sent.len(), 1, "{sent:?}");

    // The refresh token gives a new authorizer token and comes back unchanged.
    let v = post(
        &format!(
            "{}/cgi-bin/component/api_authorizer_token?component_access_token={token}",
            s.url
        ),
        &json!({ "component_appid": COMPONENT, "authorizer_appid": OA, "authorizer_refresh_token": refresh }),
    );
    assert_eq!(v["authorizer_refresh_token"], refresh.as_str(), "{v}");
    let fresh = v["authorizer_access_token"].as_str().expect("token");
    assert_ne!(fresh, authorizer);
    assert_eq!(template_send(&s, fresh)["errcode"], 0);
    // Another account's app id with this refresh token: 61023.
    let v = component(
        &s,
        "api_authorizer_token",
        &token,
        &json!({ "component_appid": COMPONENT, "authorizer_appid": OTHER_OA, "authorizer_refresh_token": refresh }),
    );
    assert_eq!(v["errcode"], 61023, "{v}");

    let v = component(
        &s,
        "api_get_authorizer_info",
        &token,
        &json!({ "component_appid": COMPONENT, "authorizer_appid": OA }),
    );
    assert_eq!(
        v["authorizer_info"]["nick_name"], "品牌公众号 brand-oa",
        "{v}"
    );
    assert_eq!(v["authorizer_info"]["service_type_info"]["id"], 2);
    assert_eq!(granted(&v["authorization_info"]["func_info"]).len(), 8);
    let v = component(
        &s,
        "api_get_authorizer_info",
        &token,
        &json!({ "component_appid": COMPONENT, "authorizer_appid": OTHER_OA }),
    );
    assert_eq!(v["errcode"], 61003, "not authorised: {v}");

    // Permission 33 was not asked for: the linked mini programs cannot be listed.
    let v = post(
        &format!("{}/cgi-bin/wxopen/wxamplinkget?access_token={fresh}", s.url),
        &json!({}),
    );
    assert_eq!(v["errcode"], 48001, "{v}");

    // The component log never shows the codes or the refresh token.
    let text = serde_json::to_string(&s.messages("channel=open_platform")).unwrap();
    for secret in [auth_code.as_str(), refresh.as_str()] {
        assert!(!text.contains(secret), "{text}");
    }
}

#[test]
fn sandbox_grant_only_revoke_and_expire_tokens_act_as_the_platform_does() {
    let p = project(KEY);
    let (s, r) = start(&p);
    let token = component_token(&s, &r.wait_for("verify ticket", ticket));

    // grant_only: 4 and 24 held by another platform; the next authorisation lacks them.
    s.faults(&json!([{ "channel": "open_platform", "match": { "touchpoint": PLATFORM }, "action": "grant_only", "permission_ids": [1, 2, 3, 7, 11, 15, 33], "count": 1 }]));
    let code = pre_auth_code(&s, &token);
    let v = query_auth(&s, &token, &authorise(&s, &code, OA, &[]));
    assert_eq!(
        granted(&v["authorization_info"]["func_info"]),
        [1, 2, 3, 7, 11, 15]
    );

    // Asking for 33 (count used up: no fault now) lets the linked mini programs be listed.
    let code = pre_auth_code(&s, &token);
    let v = query_auth(
        &s,
        &token,
        &authorise(&s, &code, OA, &[("category_id_list", "1|7|33")]),
    );
    let info = &v["authorization_info"];
    assert_eq!(granted(&info["func_info"]), [1, 7, 33]);
    let authorizer = info["authorizer_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let refresh = info["authorizer_refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let v = post(
        &format!(
            "{}/cgi-bin/wxopen/wxamplinkget?access_token={authorizer}",
            s.url
        ),
        &json!({}),
    );
    assert_eq!(v["errcode"], 0, "{v}");
    assert_eq!(v["wxopens"]["items"][0]["appid"], MINI);
    assert_eq!(v["wxopens"]["items"][0]["status"], 1);

    // Without 7 a template message is refused as WeChat does.
    let code = pre_auth_code(&s, &token);
    let v = query_auth(
        &s,
        &token,
        &authorise(&s, &code, OTHER_OA, &[("category_id_list", "1|2")]),
    );
    let other = v["authorization_info"]["authorizer_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(template_send(&s, &other)["errcode"], 48001);

    // revoke: the refresh token answers 61023, the old authorizer token is expired, and the
    // platform hears `unauthorized`.
    s.faults(&json!([{ "channel": "open_platform", "action": "revoke", "app_id": OA }]));
    let v = component(
        &s,
        "api_authorizer_token",
        &token,
        &json!({ "component_appid": COMPONENT, "authorizer_appid": OA, "authorizer_refresh_token": refresh }),
    );
    assert_eq!(v["errcode"], 61023, "{v}");
    assert!(
        v["errmsg"]
            .as_str()
            .unwrap()
            .starts_with("refresh_token is invalid rid: "),
        "{v}"
    );
    assert_eq!(template_send(&s, &authorizer)["errcode"], 42001);
    let gone = r.wait_for("unauthorized event", |e| match e {
        Event::Unauthorized {
            authorizer_app_id, ..
        } => Some(authorizer_app_id),
        _ => None,
    });
    assert_eq!(gone, OA);
    // Revoking again has nothing to revoke: refused, naming why.
    let (status, v) = http(
        "POST",
        &format!("{}/_sandbox/faults", s.url),
        None,
        Some((
            "application/json",
            br#"[{"channel":"open_platform","action":"revoke","app_id":"wx2b3c4d5e6f708192"}]"#
                .to_vec(),
        )),
    );
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains("nothing to revoke"),
        "{v}"
    );

    // expire_tokens: component and authorizer tokens answer 42001 on their next use.
    s.faults(&json!([{ "channel": "open_platform", "action": "expire_tokens" }]));
    let v = component(
        &s,
        "api_create_preauthcode",
        &token,
        &json!({ "component_appid": COMPONENT }),
    );
    assert_eq!(v["errcode"], 42001, "{v}");
    assert_eq!(template_send(&s, &other)["errcode"], 42001);
}

#[test]
fn sandbox_leaves_out_a_platform_whose_key_is_not_one_and_its_accounts() {
    let p = project("too-short");
    let s = p.start_sandbox(&[]);
    let deadline = Instant::now() + PATIENCE;
    while !s.stderr().contains("note: other-oa is not served") {
        assert!(Instant::now() < deadline, "{}", s.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = s.stderr();
    assert!(
        err.contains("warning: open-platform: the EncodingAESKey is not valid"),
        "{err}"
    );
    assert!(err.contains("left out of the sandbox"), "{err}");
    assert!(!err.contains("too-short"), "the key is not printed: {err}");
    let (status, v) = http(
        "POST",
        &format!("{}/_sandbox/tickets", s.url),
        None,
        Some((
            "application/json",
            br#"{"to":"http://127.0.0.1:9/{platform}"}"#.to_vec(),
        )),
    );
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("plays no open platform"),
        "{v}"
    );
}

#[test]
fn wechatpy_component_binds_through_the_sandbox_unchanged() {
    let p = project(KEY);
    let s = p.start_sandbox(&[]);
    let Some(run) = conformance(
        "wechatpy_component_binds_through_the_sandbox_unchanged",
        "wechatpy_component_check.py",
        &[s.url.as_str(), COMPONENT, SECRET, TOKEN, KEY, OA, TEMPLATE],
    ) else {
        return;
    };
    run.code(0).stdout_has("all checks passed");
}
