//! `touchctl auth wechat ID`: the client of the daemon's bindings API (`POST /v1/bindings`,
//! `GET /v1/bindings/{id}`). It starts a binding, prints the PC and mobile authorisation URLs
//! (each on a line of its own, `PC URL: ...` and `Mobile URL: ...`) and the mobile one as a QR
//! code, then asks the daemon every second how the binding stands until it is no longer pending,
//! and prints the outcome: the permission sets granted and those of the touchpoint's
//! `required_permissions` missing, by name and label. The daemon's words (URLs, reasons) are
//! escaped for the terminal; its answers are read up to [`MAX_ANSWER`] bytes.

use std::io::IsTerminal;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use touchctl::model::Permission;
use touchctl::term::escape;

use super::daemon::{read_token, runtime};
use super::dispatch::unauthorized;
use super::{FAILED, OK};
use crate::cli::{AuthCommand, AuthWechatArgs, QrChoice};

/// Exit code: bound, with some required permissions missing.
const MISSING: u8 = 2;

/// The most bytes of one daemon answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// How often the binding is asked after.
const POLL: Duration = Duration::from_secs(1);

/// How long past the binding's expiry the command still waits for the daemon to say how it ended
/// (an exchange under way at the expiry finishes after it).
const GRACE: Duration = Duration::from_secs(60);

/// Failed requests in a row to the daemon while waiting before the command gives up.
const UNREACHABLE_TRIES: u32 = 30;

/// What 4 and 24 missing means.
pub const EXCLUSIVE_NOTE: &str = "4 (网页服务) and 24 (开放平台帐号管理) can be held by one third-party platform only: if the account granted them to another platform, it must cancel that authorisation first";

pub fn auth_cmd(command: &AuthCommand) -> Result<u8> {
    match command {
        AuthCommand::Wechat(args) => wechat(args),
    }
}

/// One answer of the daemon.
struct Answer {
    status: reqwest::StatusCode,
    doc: Value,
}

impl Answer {
    fn message(&self) -> String {
        match self.doc.pointer("/error/message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => self.doc.to_string(),
        }
    }
}

/// Sends `request` and reads its JSON answer, at most [`MAX_ANSWER`] bytes of it.
async fn call(request: reqwest::RequestBuilder, base: &str) -> Result<Answer> {
    let mut response = request.send().await.with_context(|| {
        format!(
            "cannot reach the daemon at {base} (is `touchctl daemon` running? --daemon or TOUCHCTL_URL)"
        )
    })?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("the daemon at {base} broke off its answer"))?
    {
        if body.len() + chunk.len() > MAX_ANSWER {
            bail!(
                "the daemon at {base} answered more than {MAX_ANSWER} bytes: is --daemon the address of `touchctl daemon`?"
            );
        }
        body.extend_from_slice(&chunk);
    }
    let doc = serde_json::from_slice(&body).unwrap_or_else(|_| {
        json!({"error": {"message": String::from_utf8_lossy(&body).chars().take(500).collect::<String>()}})
    });
    Ok(Answer { status, doc })
}

fn wechat(args: &AuthWechatArgs) -> Result<u8> {
    let token = read_token(args.api_token_file.as_deref())?;
    let base = args.daemon.trim_end_matches('/').to_string();
    let token_file = args.api_token_file.as_deref();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = runtime()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let auth = |r: reqwest::RequestBuilder| match &token {
        Some(t) => r.bearer_auth(t.expose()),
        None => r,
    };
    let had_token = token.is_some();
    let refused = |answer: &Answer| -> anyhow::Error {
        if answer.status == reqwest::StatusCode::UNAUTHORIZED {
            anyhow::anyhow!("{}", unauthorized(&base, token_file, had_token))
        } else {
            anyhow::anyhow!(
                "the daemon answered {}: {}",
                answer.status,
                answer.message()
            )
        }
    };

    let started = rt.block_on(call(
        auth(client.post(format!("{base}/v1/bindings")))
            .header("content-type", "application/json")
            .body(json!({"touchpoint": args.touchpoint}).to_string()),
        &base,
    ))?;
    if started.status != reqwest::StatusCode::CREATED {
        return Err(refused(&started))
            .with_context(|| format!("cannot start binding `{}`", escape(&args.touchpoint)));
    }
    let text = |key: &str| started.doc[key].as_str().unwrap_or_default().to_string();
    let (id, pc, mobile, expires_at) = (
        text("binding_id"),
        text("pc_url"),
        text("mobile_url"),
        text("expires_at"),
    );
    if id.is_empty() || pc.is_empty() || mobile.is_empty() {
        bail!(
            "the daemon's answer to POST /v1/bindings lacks binding_id, pc_url or mobile_url: {}",
            escape(&started.doc.to_string())
        );
    }
    println!(
        "Binding `{}`: the account's administrator opens one of these and authorises the platform.",
        escape(&args.touchpoint)
    );
    println!("PC URL: {}", escape(&pc));
    println!("Mobile URL: {}", escape(&mobile));
    let draw = match args.qr {
        QrChoice::Always => true,
        QrChoice::Never => false,
        QrChoice::Auto => std::io::stdout().is_terminal(),
    };
    if draw {
        match qr(&mobile) {
            Ok(code) => {
                println!("Or scan this with WeChat (the mobile URL):");
                println!("{code}");
            }
            Err(e) => eprintln!(
                "warning: cannot draw the mobile URL as a QR code ({e}); open it from the line above"
            ),
        }
    }
    println!("The binding expires at {}.", escape(&expires_at));

    let expires = humantime::parse_rfc3339(&expires_at).unwrap_or_else(|_| {
        SystemTime::now()
            .checked_add(Duration::from_secs(15 * 60))
            .unwrap_or(SystemTime::now())
    });
    let deadline = expires.checked_add(GRACE).unwrap_or(expires);
    let live = std::io::stderr().is_terminal();
    if !live {
        eprintln!(
            "Waiting for the authorisation (until {})...",
            escape(&expires_at)
        );
    }
    let view = rt.block_on(async {
        let mut failures = 0;
        loop {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if live {
                eprint!(
                    "\rWaiting for the authorisation... {} left   ",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                );
            }
            match call(auth(client.get(format!("{base}/v1/bindings/{id}"))), &base).await {
                Ok(answer) if answer.status.is_success() => {
                    failures = 0;
                    if answer.doc["status"].as_str() != Some("pending") {
                        return Ok(answer.doc);
                    }
                }
                Ok(answer) if answer.status == reqwest::StatusCode::NOT_FOUND => {
                    bail!(
                        "the daemon no longer knows binding {id} (bindings are kept in memory: did it restart?): run `touchctl auth wechat {}` again",
                        escape(&args.touchpoint)
                    );
                }
                Ok(answer) => return Err(refused(&answer)),
                Err(e) => {
                    failures += 1;
                    if failures >= UNREACHABLE_TRIES {
                        return Err(e);
                    }
                }
            }
            if SystemTime::now() > deadline {
                bail!(
                    "binding {id} is still pending {} after its expiry: check the daemon's log, then run `touchctl auth wechat {}` again",
                    humantime::format_duration(GRACE),
                    escape(&args.touchpoint)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    });
    if live {
        eprintln!();
    }
    let view = view?;
    let (lines, errors, code) = outcome(&view, &args.touchpoint);
    for line in lines {
        println!("{line}");
    }
    for line in errors {
        eprintln!("error: {line}");
    }
    Ok(code)
}

/// The mobile URL as a QR code of Unicode half blocks, light on dark (for a dark terminal).
fn qr(url: &str) -> Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(url.as_bytes()).context("the URL is too long for a QR code")?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// A permission by name and label: `mass_send (群发与通知)`; a name this touchctl does not know as
/// it came.
fn labelled(name: &str) -> String {
    match serde_json::from_value::<Permission>(Value::String(name.to_string())) {
        Ok(p) => format!("{} ({})", p.name(), p.label()),
        Err(_) => escape(name).into_owned(),
    }
}

fn names(view: &Value, key: &str) -> Vec<String> {
    view[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// What to print of a binding that is no longer pending (lines for standard output, errors for
/// standard error) and the exit code.
fn outcome(view: &Value, touchpoint: &str) -> (Vec<String>, Vec<String>, u8) {
    let tp = escape(touchpoint);
    let reason = || escape(view["reason"].as_str().unwrap_or("no reason given")).into_owned();
    match view["status"].as_str() {
        Some("bound") => {
            let granted = names(view, "granted");
            let missing = names(view, "missing");
            let list = |names: &[String]| match names {
                [] => "none".to_string(),
                _ => names
                    .iter()
                    .map(|n| labelled(n))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let mut lines = vec![
                format!(
                    "Bound: `{tp}` is authorised by {}; its refresh token is written.",
                    escape(view["app_id"].as_str().unwrap_or("the account"))
                ),
                format!("Granted: {}", list(&granted)),
            ];
            if missing.is_empty() {
                lines.push("Every required permission is granted.".into());
                return (lines, Vec::new(), OK);
            }
            lines.push(format!("Missing: {}", list(&missing)));
            if missing
                .iter()
                .any(|m| m == Permission::Web.name() || m == Permission::OpenAccount.name())
            {
                lines.push(EXCLUSIVE_NOTE.into());
            }
            lines.push(format!(
                "To grant the missing ones, run `touchctl auth wechat {tp}` again and have the administrator tick them."
            ));
            (lines, Vec::new(), MISSING)
        }
        Some("expired") => (
            Vec::new(),
            vec![format!("the binding of `{tp}` expired: {}", reason())],
            FAILED,
        ),
        Some("failed") => (
            Vec::new(),
            vec![format!("the binding of `{tp}` failed: {}", reason())],
            FAILED,
        ),
        other => (
            Vec::new(),
            vec![format!(
                "the daemon says the binding of `{tp}` is {}, which this touchctl does not know: {}",
                escape(other.unwrap_or("(no status)")),
                escape(&view.to_string())
            )],
            FAILED,
        ),
    }
}
