//! `touchctl sandbox`: loads the touchpoints' credentials, says where it listens and what it
//! serves, and runs the sandbox until Ctrl-C or SIGTERM.

use std::io::Write;

use anyhow::{Context, Result, bail};

use touchctl::load::{self, LoadError};
use touchctl::sandbox::{self, Accounts, Options};
use touchctl::term::escape;

use super::{FAILED, OK, count_files, secret_policy};
use crate::cli::{Global, MessagesFormat, SandboxArgs, SandboxCommand};

pub fn sandbox_cmd(g: &Global, args: &SandboxArgs) -> Result<u8> {
    if let Some(SandboxCommand::Authorise { url, account }) = &args.command {
        return authorise_cmd(url, account.as_deref());
    }
    if let Some(SandboxCommand::Messages {
        url,
        channel,
        touchpoint,
        kind,
        format,
    }) = &args.command
    {
        return messages_cmd(
            url,
            channel.as_deref(),
            touchpoint.as_deref(),
            kind,
            *format,
        );
    }
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--listen {} is not a loopback address: the sandbox accepts anyone and knows your touchpoints' credentials. Listen on 127.0.0.1, or add --allow-remote on a network you trust",
            args.listen
        );
    }
    let desired = match load::load_dir(&g.dir) {
        Ok(d) => d,
        Err(LoadError::Invalid(diagnostics)) => {
            for d in &diagnostics {
                println!("{d}");
            }
            eprintln!(
                "error: {} problem(s) in {} file(s); the sandbox did not start. Fix them (touchctl validate) and start it again.",
                diagnostics.len(),
                count_files(&diagnostics)
            );
            return Ok(FAILED);
        }
        Err(e) => return Err(e.into()),
    };
    let (accounts, notices) = Accounts::load(&desired, &secret_policy(g));
    drop(desired);
    for n in &notices {
        eprintln!("{}", escape(&n.to_string()));
    }
    let options = Options {
        token_ttl: args.token_ttl,
        push_tickets_to: args.push_tickets_to.clone(),
        ticket_interval: args.ticket_interval,
        ..Options::default()
    };
    let rt = super::daemon::runtime()?;
    rt.block_on(run(g, args, accounts, options))?;
    Ok(OK)
}

async fn run(g: &Global, args: &SandboxArgs, accounts: Accounts, options: Options) -> Result<()> {
    // Before the sandbox says it listens: a signal from then on stops it cleanly.
    let stop = touchctl::daemon::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: pick another address with --listen (port 0 picks a free one)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "touchctl sandbox: listening on {base}")?;
        for line in accounts.describe(&base) {
            writeln!(out, "{}", escape(&line))?;
        }
        if !accounts.platforms.is_empty() {
            let line = match &args.push_tickets_to {
                Some(to) => format!(
                    "pushing verify tickets to {to} every {}, the first now",
                    humantime::format_duration(args.ticket_interval)
                ),
                None => "pushing no verify tickets until POST /_sandbox/tickets names a URL (or start with --push-tickets-to URL)".to_string(),
            };
            writeln!(out, "{}", escape(&line))?;
        }
        out.flush()?;
    }
    if accounts.is_empty() {
        eprintln!(
            "warning: no touchpoint under {} is served: the sandbox answers every credential as unknown",
            g.dir.display()
        );
    }
    sandbox::serve(listener, accounts, options, stop)
        .await
        .context("the sandbox stopped serving")?;
    Ok(())
}

/// The most of an authorisation page, or of the daemon's page after it, read.
const MAX_PAGE: usize = 1 << 20;

/// `touchctl sandbox authorise`: presses an account's button on the sandbox's authorisation page
/// and shows where the browser ends up (the daemon's result page), as text.
fn authorise_cmd(url: &str, account: Option<&str>) -> Result<u8> {
    let page_url = url::Url::parse(url).with_context(|| {
        format!(
            "{} is not a URL: give the PC or mobile link `touchctl auth wechat` printed",
            escape(url)
        )
    })?;
    let rt = super::daemon::runtime()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (status, final_url, body) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        let response = client
            .get(page_url.as_str())
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot open {}: is `touchctl sandbox` running there?",
                    page_url.origin().ascii_serialization()
                )
            })?;
        let status = response.status();
        let (page, _) = touchctl::channel::answer::read_capped(response, MAX_PAGE).await;
        let page = String::from_utf8_lossy(&page).into_owned();
        if !status.is_success() {
            bail!(
                "the authorisation page answered HTTP {}: {}",
                status.as_u16(),
                escape(&page_text(&page).join(" "))
            );
        }
        let buttons = authorise_buttons(&page);
        let (app_id, href) = match account {
            Some(a) => buttons
                .iter()
                .find(|(id, _)| id == a)
                .cloned()
                .with_context(|| {
                    format!(
                        "the page has no button for {}; it lists: {}",
                        escape(a),
                        escape(&listed(&buttons))
                    )
                })?,
            None => match buttons.as_slice() {
                [one] => one.clone(),
                [] => bail!(
                    "the page lists no account to authorise: {}",
                    escape(&page_text(&page).join(" "))
                ),
                _ => bail!(
                    "the page lists several accounts ({}): say which with --account APP_ID",
                    escape(&listed(&buttons))
                ),
            },
        };
        let link = page_url
            .join(&href)
            .with_context(|| format!("the button of {} does not lead to a URL", escape(&app_id)))?;
        // The sandbox redirects to the daemon's page, as it would a browser.
        let response = client.get(link.as_str()).send().await.with_context(|| {
            format!(
                "the authorisation of {} could not be followed to its end",
                escape(&app_id)
            )
        })?;
        let status = response.status();
        let final_url = response.url().clone();
        let (body, _) = touchctl::channel::answer::read_capped(response, MAX_PAGE).await;
        Ok::<_, anyhow::Error>((
            status,
            final_url,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} answered HTTP {}:",
        escape(final_url.origin().ascii_serialization().as_str()),
        status.as_u16()
    )?;
    for line in page_text(&body) {
        writeln!(out, "  {}", escape(&line))?;
    }
    Ok(if status.is_success() { OK } else { FAILED })
}

/// The accounts an authorisation page offers: (app id, the link of its button).
fn authorise_buttons(page: &str) -> Vec<(String, String)> {
    page.split('<')
        .filter_map(|tag| {
            let id = tag.split("id=\"authorise-").nth(1)?.split('"').next()?;
            let href = tag.split("href=\"").nth(1)?.split('"').next()?;
            Some((
                html_escape::decode_html_entities(id).into_owned(),
                html_escape::decode_html_entities(href).into_owned(),
            ))
        })
        .collect()
}

fn listed(buttons: &[(String, String)]) -> String {
    buttons
        .iter()
        .map(|(id, _)| id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The visible text of a small HTML page, a line per block, without its title.
fn page_text(page: &str) -> Vec<String> {
    let body = page.split_once("</head>").map_or(page, |(_, b)| b);
    body.split('<')
        .filter_map(|part| part.split_once('>').map(|(_, text)| text))
        .map(|text| html_escape::decode_html_entities(text.trim()).into_owned())
        .filter(|text| !text.is_empty())
        .collect()
}

/// The most of the sandbox's answer read (its log holds at most 100,000 requests).
const MAX_ANSWER: usize = 512 << 20;

/// `touchctl sandbox messages`: what a running sandbox received.
fn messages_cmd(
    url: &str,
    channel: Option<&str>,
    touchpoint: Option<&str>,
    kind: &str,
    format: MessagesFormat,
) -> Result<u8> {
    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(c) = channel {
        query.push(("channel", c));
    }
    if let Some(t) = touchpoint {
        query.push(("touchpoint", t));
    }
    if kind != "all" {
        query.push(("kind", kind));
    }
    let mut endpoint = url::Url::parse(&format!("{}/_sandbox/messages", url.trim_end_matches('/')))
        .with_context(|| format!("--url {url} is not a URL, e.g. http://127.0.0.1:8641"))?;
    if !query.is_empty() {
        endpoint.query_pairs_mut().extend_pairs(&query);
    }
    let rt = super::daemon::runtime()?;
    // One process-wide TLS provider (reqwest is built without a default one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (status, body) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        let response = client.get(endpoint.as_str()).send().await?;
        let status = response.status();
        let (body, _) = touchctl::channel::answer::read_capped(response, MAX_ANSWER).await;
        Ok::<_, reqwest::Error>((status, body))
    })
    .with_context(|| {
        format!("cannot reach the sandbox at {url}: is `touchctl sandbox` running there? (--url or TOUCHCTL_SANDBOX_URL)")
    })?;
    if !status.is_success() {
        bail!(
            "the sandbox at {url} answered HTTP {}{}",
            status.as_u16(),
            touchctl::channel::answer::excerpt(&body)
        );
    }
    if format == MessagesFormat::Json {
        println!(
            "{}",
            touchctl::term::json(String::from_utf8_lossy(&body).trim().to_string())
        );
        return Ok(OK);
    }
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{url} did not answer as touchctl sandbox does"))?;
    let entries = doc["messages"].as_array().cloned().unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if entries.is_empty() {
        writeln!(out, "(nothing received)")?;
    }
    for e in &entries {
        writeln!(out, "{}", escape(&line(e)))?;
    }
    Ok(OK)
}

/// One request as a line: `#seq channel touchpoint endpoint → recipients: what it carried (answer)`.
fn line(e: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let recipients: Vec<String> = e["recipients"]
        .as_array()
        .map(|r| r.iter().map(text).collect())
        .unwrap_or_default();
    let shown = match recipients.len() {
        0 => String::new(),
        1..=3 => format!(" → {}", recipients.join(", ")),
        n => format!(" → {}, … ({n} in all)", recipients[..2].join(", ")),
    };
    let answer = &e["answer"];
    let code = match (&e["channel"].as_str(), &answer["code"]) {
        (Some("custom"), _) | (_, serde_json::Value::Null) => {
            format!("HTTP {}", answer["http_status"])
        }
        (Some("getui"), c) => format!("code {c}"),
        (_, c) => format!("errcode {c}"),
    };
    let failed = e["failed"].as_array().map_or(0, Vec::len);
    let mut verdict = code;
    if failed > 0 {
        verdict.push_str(&format!(", {failed} failed"));
    }
    if e["duplicate"].as_bool() == Some(true) {
        verdict.push_str(", duplicate: not delivered again");
    }
    let carried = carried(e);
    format!(
        "#{} {} {} {}{shown}{}{} ({verdict})",
        e["seq"],
        text(&e["channel"]),
        e["touchpoint"].as_str().unwrap_or("?"),
        text(&e["endpoint"]),
        if carried.is_empty() { "" } else { ": " },
        carried
    )
}

/// What a request carried, in a few words: the template and its values, the text, the title.
fn carried(e: &serde_json::Value) -> String {
    let body = &e["body"];
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let short = |t: String| {
        let cut: String = t.chars().take(60).collect();
        if cut.chars().count() < t.chars().count() {
            format!("{cut}…")
        } else {
            t
        }
    };
    let values = |m: &serde_json::Map<String, serde_json::Value>,
                  pick: fn(&serde_json::Value) -> Option<String>| {
        m.iter()
            .filter_map(|(k, v)| pick(v).map(|v| format!("{k}={}", short(v))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match (e["channel"].as_str(), e["endpoint"].as_str()) {
        (Some("oa"), Some("/cgi-bin/message/template/send")) => format!(
            "template {} {}",
            s(&body["template_id"]).unwrap_or_default(),
            body["data"]
                .as_object()
                .map(|d| values(d, |v| v["value"].as_str().map(str::to_string)))
                .unwrap_or_default()
        ),
        (Some("wecom"), Some("/cgi-bin/message/send")) => {
            let kind = s(&body["msgtype"]).unwrap_or_default();
            let part = &body[kind.as_str()];
            let what = s(&part["content"])
                .or_else(|| s(&part["title"]))
                .or_else(|| s(&part["articles"][0]["title"]))
                .unwrap_or_default();
            format!("{kind} {}", short(what))
        }
        (Some("wecom"), _) => s(&body["text"]["content"])
            .or_else(|| s(&body["attachments"][0]["link"]["title"]))
            .map(short)
            .unwrap_or_default(),
        (Some("getui"), Some(p)) if p.ends_with("/push/list/message") => {
            let n = &body["push_message"]["notification"];
            format!(
                "notification {} / {}",
                short(s(&n["title"]).unwrap_or_default()),
                short(s(&n["body"]).unwrap_or_default())
            )
        }
        (Some("custom"), _) => body["template"]
            .as_object()
            .map(|t| {
                values(t, |v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                })
            })
            .unwrap_or_default(),
        _ => String::new(),
    }
}
