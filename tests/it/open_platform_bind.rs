//! Binding an Official Account through the open platform end to end, against `touchctl sandbox`
//! playing WeChat: the sandbox pushes a verify ticket to the daemon, `touchctl auth wechat`
//! starts a binding and prints the authorisation URLs, a test follows the PC URL's page and its
//! button with plain HTTP (as the administrator's browser would), the command reports the
//! outcome, the refresh token file is written 0600, and a template message goes out with the
//! authorizer token.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon_support::{Daemon, PATIENCE, SandboxProcess, http};
use crate::support::{Project, conformance};

const APP_ID: &str = "wx8a7c3e1f5b2d4690";
/// Another account on the same platform.
const OTHER_APP_ID: &str = "wx0b1c2d3e4f5a6b7c";

fn platform_file(api_base: &str) -> String {
    format!(
        r#"id = "open-platform"
name = "营销开放平台"
kind = "wechat_open_platform"
component_app_id = "wx5f4e3d2c1b0a9f8e"
component_secret = {{ file = "../secrets/component_secret" }}
token = {{ file = "../secrets/component_token" }}
encoding_aes_key = {{ file = "../secrets/component_aes_key" }}
api_base = "{api_base}"
allow_insecure = true
"#
    )
}

fn oa_file(api_base: &str, required: &str) -> String {
    account_file("wechat-oa", APP_ID, api_base, required)
}

fn account_file(id: &str, app_id: &str, api_base: &str, required: &str) -> String {
    format!(
        r#"id = "{id}"
name = "品牌公众号"
kind = "wechat_official_account"
category = "notification"
app_id = "{app_id}"
api_base = "{api_base}"
allow_insecure = true
{required}
[auth]
mode = "third_party"
platform = "open-platform"
authorizer_refresh_token = {{ file = "../secrets/{id}_refresh_token" }}

[dynamic_params]
openid = "user.wechat_openid"

[[templates]]
id = "order_shipped"
template_id = "TM00015-kD3xq8Vb"
fields = ["first", "keyword1"]
"#
    )
}

/// The sandbox and the daemon on one project, the platform's ticket pushed and kept.
fn start(required: &str) -> (Project, SandboxProcess, Daemon) {
    start_with(required, &[])
}

/// The same, the sandbox started with `sandbox_args`.
fn start_with(required: &str, sandbox_args: &[&str]) -> (Project, SandboxProcess, Daemon) {
    let p = Project::empty();
    p.write("secrets/component_secret", "component-secret-value\n")
        .write("secrets/component_token", "Tk9wPlatformToken\n")
        .write(
            "secrets/component_aes_key",
            "Q2f8ZkLm3Np7Rt1Vx5Bz9Cd4Gh6Jk0Ms2Pw8Ty3Ua7E\n",
        )
        .write(
            "touchpoints/open-platform.toml",
            &platform_file("http://127.0.0.1:8641"),
        )
        .write(
            "touchpoints/wechat-oa.toml",
            &oa_file("http://127.0.0.1:8641", required),
        )
        .write(
            "touchpoints/other-oa.toml",
            &account_file("other-oa", OTHER_APP_ID, "http://127.0.0.1:8641", ""),
        );
    let sandbox = p.start_sandbox(sandbox_args);
    p.write(
        "touchpoints/open-platform.toml",
        &platform_file(&sandbox.url),
    )
    .write(
        "touchpoints/wechat-oa.toml",
        &oa_file(&sandbox.url, required),
    );
    p.run(&["apply", "--auto-approve"]).code(0);
    let d = p.start_daemon(&["--insecure-no-auth", "--allow-private-network"], &[]);
    let (code, pushed) = http(
        "POST",
        &format!("{}/_sandbox/tickets", sandbox.url),
        None,
        Some((
            "application/json",
            json!({"to": format!("{}/wechat/platforms/{{platform}}/events", d.url)})
                .to_string()
                .into_bytes(),
        )),
    );
    assert_eq!(code, 200, "{pushed}");
    d.wait_until("/v1/status", "the verify ticket was not kept", |_, s| {
        s["platforms"][0]["ticket"] == "present"
    });
    (p, sandbox, d)
}

/// `touchctl auth wechat` running, its standard output read line by line.
struct Auth {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Auth {
    fn start(p: &Project, d: &Daemon) -> Self {
        let mut child = p
            .command(&[
                "auth",
                "wechat",
                "wechat-oa",
                "--daemon",
                &d.url,
                "--qr",
                "always",
            ])
            .env_remove("TOUCHCTL_API_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start auth wechat");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The text after `prefix` on the first line that starts with it.
    fn line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(l) = self.seen.iter().find_map(|l| l.strip_prefix(prefix)) {
                return l.to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line `{prefix}`: {:?}", self.seen),
            }
        }
    }

    /// Waits for the command to exit: its code and everything it printed (standard output, then
    /// standard error).
    fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "auth wechat did not finish: {:?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader ends with the output.
        while let Ok(l) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(l);
        }
        let mut errors = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut errors);
        }
        (
            status.code().unwrap_or(-1),
            format!("{}\n{errors}", self.seen.join("\n")),
        )
    }
}

/// What the administrator does: opens the PC URL and presses the account's button.
fn authorise(pc_url: &str) -> String {
    authorise_as(pc_url, None)
}

/// The same, the account's button's link changed to authorise `other` instead (an administrator
/// of another account scanning).
fn authorise_as(pc_url: &str, other: Option<&str>) -> String {
    let (code, page) = http("GET", pc_url, None, None);
    assert_eq!(code, 200, "{page}");
    let page = page["raw"].as_str().expect("an HTML page").to_string();
    let anchor = format!("id=\"authorise-{APP_ID}\"");
    let tag = page
        .split('<')
        .find(|t| t.contains(&anchor))
        .unwrap_or_else(|| panic!("no button for {APP_ID}:\n{page}"));
    let href = tag
        .split("href=\"")
        .nth(1)
        .and_then(|h| h.split('"').next())
        .unwrap_or_else(|| panic!("no href: {tag}"))
        .replace("&amp;", "&");
    let href = match other {
        Some(other) => href
            .replace(&format!("&biz_appid={APP_ID}"), "")
            .replace(&format!("app_id={APP_ID}"), &format!("app_id={other}")),
        None => href,
    };
    let base = pc_url.split("/cgi-bin/").next().unwrap();
    let link = if href.starts_with("http") {
        href
    } else {
        format!("{base}{href}")
    };
    // Redirects followed: the sandbox sends the browser on to the daemon's page.
    let (code, answer) = http("GET", &link, None, None);
    assert_eq!(code, 200, "{answer}");
    answer["raw"].as_str().unwrap_or_default().to_string()
}

#[test]
fn an_account_is_bound_through_the_sandbox_and_then_sent_to() {
    let (p, sandbox, d) = start("");
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    let mobile = auth.line("Mobile URL: ");
    assert!(
        pc.starts_with(&format!("{}/cgi-bin/componentloginpage?", sandbox.url)),
        "{pc}"
    );
    assert!(mobile.contains("bindcomponent"), "{mobile}");
    let page = authorise(&pc);
    assert!(page.contains("is bound to touchpoint"), "{page}");
    let (code, out) = auth.finish();
    assert_eq!(code, 0, "{out}\n{}", d.log());
    assert!(
        out.contains(&format!("Bound: `wechat-oa` is authorised by {APP_ID}")),
        "{out}"
    );
    assert!(out.contains("mass_send (群发与通知)"), "{out}");
    assert!(
        out.contains('\u{2588}') || out.contains('\u{2580}'),
        "the QR code: {out}"
    );

    let file = p.path().join("secrets/wechat-oa_refresh_token");
    let mode = std::fs::metadata(&file)
        .expect("refresh token written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let refresh = std::fs::read_to_string(&file).unwrap();
    assert!(!refresh.trim().is_empty());
    assert!(
        !d.log().contains(refresh.trim()),
        "the refresh token is a secret"
    );

    let tp = d.wait_until(
        "/v1/touchpoints/wechat-oa",
        "granted permissions shown",
        |_, t| t["granted"].is_array(),
    );
    assert_eq!(tp["missing"], json!([]), "{tp}");
    let (code, r) = d.dispatch(&json!({
        "touchpoint": "wechat-oa", "campaign": "c", "template": "order_shipped",
        "template_params": {"first": "您的订单已发货", "keyword1": "SF1234"},
        "users": [{"user_id": "u1", "attributes": {"wechat_openid": "o1"}}]
    }));
    assert_eq!(code, 202, "{r}");
    let status = d.wait_finished(r["dispatch_id"].as_str().unwrap());
    assert_eq!(status["delivered"], 1, "{status}\n{}", d.log());
    let sends: Vec<Value> = sandbox.messages("channel=oa&kind=message");
    assert_eq!(sends.len(), 1, "{sends:?}");
}

#[test]
fn missing_permissions_are_named_and_exit_2() {
    let (p, sandbox, d) = start("");
    sandbox.faults(&json!([{"channel": "open_platform", "action": "grant_only", "permission_ids": [1, 2, 3, 7, 11, 15]}]));
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    let page = authorise(&pc);
    assert!(
        page.contains("Missing: web (网页服务), open_account (开放平台帐号管理)"),
        "{page}"
    );
    let (code, out) = auth.finish();
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("Missing: web (网页服务), open_account (开放平台帐号管理)"),
        "{out}"
    );
    assert!(
        out.contains("can be held by one third-party platform only"),
        "{out}"
    );
}

#[test]
fn a_revoked_authorisation_holds_the_touchpoint_and_a_new_binding_releases_it() {
    let (p, sandbox, d) = start("");
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    authorise(&pc);
    assert_eq!(auth.finish().0, 0);
    d.wait_until("/v1/touchpoints/wechat-oa", "ready once bound", |_, t| {
        t["state"] == "ready"
    });

    sandbox.faults(&json!([{"channel": "open_platform", "action": "revoke", "app_id": APP_ID}]));
    let held = d.wait_until(
        "/v1/touchpoints/wechat-oa",
        "held by the unauthorized event",
        |_, t| t["state"] == "held",
    );
    let reason = held["held"].as_str().unwrap();
    assert!(
        reason.contains("unauthorized event: authorisation revoked by the account; re-authorise with `touchctl auth wechat wechat-oa`"),
        "{held}"
    );
    let (code, r) = d.dispatch(&json!({
        "touchpoint": "wechat-oa", "campaign": "c", "template": "order_shipped",
        "template_params": {"first": "x", "keyword1": "y"},
        "users": [{"user_id": "u1", "attributes": {"wechat_openid": "o1"}}]
    }));
    assert_eq!(code, 409, "{r}");

    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    authorise(&pc);
    assert_eq!(auth.finish().0, 0);
    d.wait_until(
        "/v1/touchpoints/wechat-oa",
        "released by the new binding",
        |_, t| t["state"] == "ready",
    );
}

#[test]
fn a_code_for_another_account_fails_the_binding_and_writes_nothing() {
    let (p, _sandbox, d) = start("");
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    let page = authorise_as(&pc, Some(OTHER_APP_ID));
    let reason = format!(
        "the account that authorised is {OTHER_APP_ID}, but touchpoint wechat-oa is {APP_ID}: ask the administrator of {APP_ID} to scan"
    );
    assert!(page.contains(&reason), "{page}");
    let (code, out) = auth.finish();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: the binding of `wechat-oa` failed: {reason}"
        )),
        "{out}"
    );
    assert!(!p.path().join("secrets/wechat-oa_refresh_token").exists());
    assert!(!p.path().join("secrets/other-oa_refresh_token").exists());
    assert!(d.log().contains(&reason), "{}", d.log());
}

#[test]
fn a_person_binds_in_a_real_browser() {
    let (p, _sandbox, d) = start("");
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    // Headless Chromium opens the link, and the button is clicked as a person clicks it.
    let Some(run) = conformance(
        "a_person_binds_in_a_real_browser",
        "browser_authorise.py",
        &[pc.as_str(), APP_ID],
    ) else {
        return;
    };
    run.code(0)
        .stdout_has(&format!(
            "url: {}/wechat/platforms/open-platform/authorized?",
            d.url
        ))
        .stdout_has(&format!(
            "The account {APP_ID} is bound to touchpoint `wechat-oa`."
        ));
    let (code, out) = auth.finish();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("Bound: `wechat-oa` is authorised by {APP_ID}")),
        "{out}"
    );
    assert!(p.path().join("secrets/wechat-oa_refresh_token").exists());
}

#[test]
fn sandbox_authorise_presses_the_button_from_a_terminal_once() {
    let (p, _sandbox, d) = start("");
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    p.run(&["sandbox", "authorise", &pc])
        .code(0)
        .stdout_has(&format!("{} answered HTTP 200:", d.url))
        .stdout_has(&format!(
            "  The account {APP_ID} is bound to touchpoint `wechat-oa`."
        ));
    assert_eq!(auth.finish().0, 0);
    // A link authorises once, as WeChat's does.
    let again = p.run(&["sandbox", "authorise", &pc]);
    again.code(1);
    assert!(
        again.stderr.contains("answered HTTP 410") && again.stderr.contains("used already"),
        "{}",
        again.stderr
    );
}

#[test]
fn an_expired_binding_is_refused_and_nothing_is_written() {
    // Pre-auth codes of this sandbox last two seconds, and the binding with them.
    let (p, _sandbox, d) = start_with("", &["--token-ttl", "2s"]);
    let mut auth = Auth::start(&p, &d);
    let pc = auth.line("PC URL: ");
    let redirect = url::Url::parse(&pc)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .expect("redirect_uri");
    let (code, out) = auth.finish();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: the binding of `wechat-oa` expired"),
        "{out}"
    );
    // An authorisation code arriving for it now (a late browser) is refused.
    let (code, page) = http(
        "GET",
        &format!("{redirect}&auth_code=queryauthcode%40%40%40late&expires_in=600"),
        None,
        None,
    );
    let page = page["raw"].as_str().unwrap_or_default().to_string();
    assert!(
        page.contains("This binding expired: run touchctl auth wechat again."),
        "{code} {page}"
    );
    assert!(!p.path().join("secrets/wechat-oa_refresh_token").exists());
}
