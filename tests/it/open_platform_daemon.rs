//! The daemon's open platform URLs: a live `wechat_open_platform` is listed apart from the
//! touchpoints, its event URL takes ticket pushes sealed as WeChat seals them (by the library's
//! `MsgCrypt`, and by wechatpy's own `WeChatCrypto`), refuses a bad signature and an unknown
//! platform, and the bindings API refuses what it cannot bind, saying what to do.

use serde_json::{Value, json};
use touchctl::channel::open_platform::crypt::MsgCrypt;
use touchctl::channel::open_platform::event::{self, Event};

use crate::daemon_support::{Daemon, http};
use crate::support::{Project, conformance};

const TOKEN: &str = "Tk9wPlatformToken";
const KEY: &str = "Q2f8ZkLm3Np7Rt1Vx5Bz9Cd4Gh6Jk0Ms2Pw8Ty3Ua7E";
const COMPONENT: &str = "wx5f4e3d2c1b0a9f8e";
const TICKET: &str = "ticket@@@e2f1c3d4b5a6";

const PLATFORM_FILE: &str = r#"id = "open-platform"
name = "营销开放平台"
kind = "wechat_open_platform"
component_app_id = "wx5f4e3d2c1b0a9f8e"
component_secret = { env = "COMPONENT_SECRET" }
token = { env = "COMPONENT_TOKEN" }
encoding_aes_key = { env = "COMPONENT_AES_KEY" }
"#;

const OA_FILE: &str = r#"id = "wechat-oa"
name = "品牌公众号"
kind = "wechat_official_account"
category = "notification"
app_id = "wx8a7c3e1f5b2d4690"

[auth]
mode = "third_party"
platform = "open-platform"
authorizer_refresh_token = { file = "oa_refresh_token" }

[dynamic_params]
openid = "user.wechat_openid"
"#;

const ENV: [(&str, &str); 4] = [
    ("SINK_TOKEN", "sink-token-value"),
    ("COMPONENT_SECRET", "component-secret-value"),
    ("COMPONENT_TOKEN", TOKEN),
    ("COMPONENT_AES_KEY", KEY),
];

/// A project with the platform and a third-party account, applied, and its daemon.
fn start() -> (Project, Daemon) {
    let p = Project::empty();
    p.write("touchpoints/open-platform.toml", PLATFORM_FILE)
        .write("touchpoints/wechat-oa.toml", OA_FILE)
        .write(
            "touchpoints/sms.toml",
            &crate::daemon_support::custom_touchpoint(
                "sms",
                "https://sms.example.com/hook",
                10,
                "",
            ),
        );
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = p.start_daemon(&["--insecure-no-auth"], &ENV);
    (p, d)
}

fn ticket_push(ticket: &str) -> String {
    event::render(
        &Event::VerifyTicket {
            ticket: ticket.into(),
            create_time: 1_767_225_600,
        },
        COMPONENT,
    )
}

/// POSTs `body` to the platform's event URL as WeChat does.
fn push(d: &Daemon, platform: &str, body: &str, signature: &str) -> (u16, Value) {
    http(
        "POST",
        &format!(
            "{}/wechat/platforms/{platform}/events?signature=x&timestamp=1767225600&nonce=407315626&encrypt_type=aes&msg_signature={signature}",
            d.url
        ),
        None,
        Some(("text/xml", body.as_bytes().to_vec())),
    )
}

fn platform_status(d: &Daemon) -> Value {
    let (code, status) = d.call("GET", "/v1/status", None);
    assert_eq!(code, 200, "{status}");
    let platforms = status["platforms"].as_array().expect("platforms").clone();
    assert_eq!(platforms.len(), 1, "{status}");
    platforms[0].clone()
}

#[test]
fn a_sealed_ticket_push_is_kept_and_bad_pushes_are_refused() {
    let (p, d) = start();
    let platform = platform_status(&d);
    assert_eq!(platform["id"], "open-platform");
    assert_eq!(platform["component_app_id"], COMPONENT);
    assert_eq!(platform["ticket"], "missing");
    assert!(platform.get("problem").is_none(), "{platform}");

    let crypt = MsgCrypt::new(TOKEN, KEY, COMPONENT).unwrap();
    let (body, signature) = crypt
        .seal(&ticket_push(TICKET), "1767225600", "407315626")
        .unwrap();

    // Under another signature: refused, nothing kept, nothing of the body in the log.
    let (code, answer) = push(&d, "open-platform", &body, &"0".repeat(40));
    assert_eq!(code, 401, "{answer}");
    assert_eq!(platform_status(&d)["ticket"], "missing");
    // An unknown platform, and a body that is not a push.
    let (code, answer) = push(&d, "other-platform", &body, &signature);
    assert_eq!(code, 404, "{answer}");
    assert!(
        answer["raw"].as_str().unwrap().contains("other-platform"),
        "{answer}"
    );
    let (code, _) = push(&d, "open-platform", "<xml>not a push", &signature);
    assert_eq!(code, 400);

    let (code, answer) = push(&d, "open-platform", &body, &signature);
    assert_eq!((code, answer), (200, json!({"raw": "success"})));
    // Again (WeChat retries): the same answer.
    let (code, answer) = push(&d, "open-platform", &body, &signature);
    assert_eq!((code, answer), (200, json!({"raw": "success"})));
    let platform = platform_status(&d);
    assert_eq!(platform["ticket"], "present", "{platform}");
    assert!(platform["ticket_received_at"].is_string(), "{platform}");
    let kept: String = p.query_one("SELECT ticket FROM platform_tickets");
    assert_eq!(kept, TICKET);

    let log = d.log();
    assert!(
        log.contains("platform `open-platform`: verify ticket received"),
        "{log}"
    );
    assert!(
        log.contains("warning: refused a push to platform `open-platform`"),
        "{log}"
    );
    assert!(!log.contains(TICKET), "the ticket is a secret:\n{log}");
    let encrypt = body.split("<Encrypt><![CDATA[").nth(1).unwrap();
    assert!(!log.contains(&encrypt[..40]), "no body in the log:\n{log}");
    // Counted per live platform, for alerting on tickets that stop coming; an unknown
    // platform's id is not a label.
    let (_, metrics) = d.call("GET", "/metrics", None);
    let text = metrics["raw"].as_str().unwrap();
    for line in [
        "touchctl_open_platform_events_total{platform=\"open-platform\",event=\"component_verify_ticket\"} 2",
        "touchctl_open_platform_events_total{platform=\"open-platform\",event=\"refused\"} 2",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    assert!(!text.contains("other-platform"), "{text}");
}

#[test]
fn a_platform_is_not_a_touchpoint_and_bindings_say_what_they_need() {
    let (_p, d) = start();
    let (code, list) = d.call("GET", "/v1/touchpoints", None);
    assert_eq!(code, 200);
    let ids: Vec<&str> = list["touchpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sms", "wechat-oa"], "{list}");

    let (code, answer) = d.dispatch(&json!({
        "touchpoint": "open-platform", "campaign": "c",
        "users": [{"user_id": "u1", "attributes": {}}]
    }));
    assert_eq!(code, 404, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("is a wechat_open_platform, not a touchpoint"),
        "{message}"
    );

    let bind = |tp: &str| {
        d.call(
            "POST",
            "/v1/bindings",
            Some((
                "application/json",
                json!({"touchpoint": tp}).to_string().into_bytes(),
            )),
        )
    };
    let (code, answer) = bind("nope");
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (404, Some("unknown_touchpoint"))
    );
    let (code, answer) = bind("open-platform");
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (404, Some("not_a_touchpoint"))
    );
    let (code, answer) = bind("sms");
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (422, Some("not_third_party")),
        "{answer}"
    );
    // No verify ticket yet: WeChat gives no pre-auth code without one.
    let (code, answer) = bind("wechat-oa");
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "no_verify_ticket", "{answer}");

    let (code, answer) = d.call("GET", "/v1/bindings/bnd_0123", None);
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (404, Some("unknown_binding"))
    );
    // The redirect of a binding this daemon does not know: a page that says what to do.
    let page = http(
        "GET",
        &format!(
            "{}/wechat/platforms/open-platform/authorized?auth_code=x&expires_in=600&state=bnd_0123",
            d.url
        ),
        None,
        None,
    );
    assert_eq!(page.0, 404);
    assert!(
        page.1["raw"]
            .as_str()
            .unwrap()
            .contains("run `touchctl auth wechat` again"),
        "{page:?}"
    );
}

#[test]
fn the_bindings_api_and_the_events_need_what_each_needs() {
    // Bindings are behind the API token; WeChat's event URL is not (it is signed instead).
    let p = Project::empty();
    p.write("touchpoints/open-platform.toml", PLATFORM_FILE)
        .write("touchpoints/wechat-oa.toml", OA_FILE);
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let token = "0123456789abcdef0123456789abcdef";
    let mut env = ENV.to_vec();
    env.push(("TOUCHCTL_API_TOKEN", token));
    let d = p.start_daemon(&[], &env);
    let (code, _) = d.call("GET", "/v1/bindings/bnd_0123", None);
    assert_eq!(code, 401);
    let crypt = MsgCrypt::new(TOKEN, KEY, COMPONENT).unwrap();
    let (body, signature) = crypt
        .seal(&ticket_push(TICKET), "1767225600", "407315626")
        .unwrap();
    let (code, answer) = push(&d, "open-platform", &body, &signature);
    assert_eq!((code, answer), (200, json!({"raw": "success"})));
}

#[test]
fn wechatpy_seals_a_ticket_push_the_daemon_accepts() {
    let (p, d) = start();
    let Some(run) = conformance(
        "wechatpy_seals_a_ticket_push_the_daemon_accepts",
        "wechatpy_ticket_push.py",
        &[
            &format!("{}/wechat/platforms/open-platform/events", d.url),
            TOKEN,
            KEY,
            COMPONENT,
            "ticket@@@from-wechatpy",
        ],
    ) else {
        return;
    };
    run.code(0)
        .stdout_has("status: 200")
        .stdout_has("body: success");
    let kept: String = p.query_one("SELECT ticket FROM platform_tickets");
    assert_eq!(kept, "ticket@@@from-wechatpy");
    assert_eq!(platform_status(&d)["ticket"], "present");
}
