//! What the open platform pushes to a platform's 授权事件接收 URL (CHANNELS.md §2.1): a fresh
//! `component_verify_ticket` every `--ticket-interval` (the first right at start), and the
//! `authorized` / `unauthorized` events when an account authorises or a `revoke` fault withdraws.
//!
//! Each push is the event's XML sealed with the platform's token and EncodingAESKey
//! ([`MsgCrypt::seal`]), POSTed as `text/xml` to the push URL (`{platform}` replaced by the
//! platform's id) with the query WeChat adds: `timestamp`, `nonce`, `encrypt_type=aes`,
//! `msg_signature` and `signature` (the SHA-1 of the sorted token, timestamp and nonce). The
//! receiver must answer the body `success`; any other answer is written to standard error
//! (escaped), and nothing is retried: the next ticket comes with the next interval. A ticket
//! counts as pushed whether or not the receiver took it (the component keeps working with the
//! tickets before it).
//!
//! The push URL is `--push-tickets-to`, or the last `to` given to `POST /_sandbox/tickets`, which
//! pushes a ticket to every platform at once and answers `{"pushed": [{"platform", "status"}]}`.
//! Answers are read up to [`MAX_ANSWER`]; a push gives up after [`PUSH_TIMEOUT`].
//!
//! [`MsgCrypt::seal`]: crate::channel::open_platform::crypt::MsgCrypt::seal

use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};

use super::{JSON, Sandbox, Shared, hex, json_answer, lock, now, problem, read_body};
use crate::channel::open_platform::event::{Event, render};
use crate::term::escape;

/// How long one push may take.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of a receiver's answer read.
pub const MAX_ANSWER: usize = 64 * 1024;

/// What a receiver must answer.
const SUCCESS: &str = "success";

/// Where pushes go, and the client that sends them.
pub struct Pusher {
    client: Result<reqwest::Client, String>,
    to: Mutex<Option<String>>,
}

impl Pusher {
    /// A pusher to `to` (none until `POST /_sandbox/tickets` names one).
    pub fn new(to: Option<String>) -> Self {
        // One process-wide TLS provider (reqwest is built without a default one).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(PUSH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string());
        Self {
            client,
            to: Mutex::new(to),
        }
    }

    fn target(&self) -> Option<String> {
        lock(&self.to).clone()
    }

    fn set_target(&self, to: String) {
        *lock(&self.to) = Some(to);
    }
}

/// The URL a push to the platform `id` goes to.
fn url_for(to: &str, id: &str) -> String {
    to.replace("{platform}", id)
}

/// Checks a push URL: with `{platform}` filled in, an absolute http(s) URL.
pub fn check_url(to: &str) -> Result<(), String> {
    match url::Url::parse(&url_for(to, "platform")) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        Ok(u) => Err(format!(
            "{to} is not an http(s) URL (its scheme is {}): give the daemon's event URL, e.g. http://127.0.0.1:8640/wechat/platforms/{{platform}}/events",
            u.scheme()
        )),
        Err(e) => Err(format!(
            "{to} is not a URL ({e}): give the daemon's event URL, e.g. http://127.0.0.1:8640/wechat/platforms/{{platform}}/events"
        )),
    }
}

/// The plain `signature` WeChat adds beside `msg_signature`: the hex SHA-1 of the token,
/// timestamp and nonce, sorted and joined.
fn plain_signature(token: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [token, timestamp, nonce];
    parts.sort_unstable();
    let mut sha = Sha1::new();
    for p in parts {
        sha.update(p.as_bytes());
    }
    hex::encode(sha.finalize())
}

/// Pushes `event` for the platform at `platform` to `to`; returns `success` or what went wrong,
/// which it also writes to standard error.
async fn push(s: &Sandbox, platform: usize, event: &Event, to: &str) -> String {
    let account = &s.accounts.platforms[platform];
    let url = url_for(to, &account.id);
    let status = send(s, platform, event, &url).await;
    if status != SUCCESS {
        eprintln!(
            "{}",
            escape(&format!(
                "warning: the {} push for {} to {url}: {status}",
                event.info_type(),
                account.id
            ))
        );
    }
    status
}

async fn send(s: &Sandbox, platform: usize, event: &Event, url: &str) -> String {
    let account = &s.accounts.platforms[platform];
    let client = match &s.pusher.client {
        Ok(c) => c,
        Err(e) => return format!("not sent: no HTTP client ({e})"),
    };
    let timestamp = (now() / 1000).to_string();
    let nonce = u64::from_str_radix(&hex(4), 16).unwrap_or(0).to_string();
    let xml = render(event, &account.component_app_id);
    let (body, msg_signature) = match account.crypt.seal(&xml, &timestamp, &nonce) {
        Ok(sealed) => sealed,
        Err(e) => return format!("not sent: {e}"),
    };
    let signature = plain_signature(account.token.expose(), &timestamp, &nonce);
    let mut target = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return format!("not sent: not a URL ({e})"),
    };
    target
        .query_pairs_mut()
        .append_pair("timestamp", &timestamp)
        .append_pair("nonce", &nonce)
        .append_pair("encrypt_type", "aes")
        .append_pair("msg_signature", &msg_signature)
        .append_pair("signature", &signature);
    let sent = client
        .post(target)
        .header(reqwest::header::CONTENT_TYPE, "text/xml")
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => return format!("not delivered: {}", e.without_url()),
    };
    let code = response.status();
    let (answer, _) = crate::channel::answer::read_capped(response, MAX_ANSWER).await;
    let text = String::from_utf8_lossy(&answer);
    if code.is_success() && text.trim() == SUCCESS {
        return SUCCESS.to_string();
    }
    format!(
        "answered HTTP {}{} where `success` was expected",
        code.as_u16(),
        crate::channel::answer::excerpt(&answer)
    )
}

/// Pushes a fresh ticket to every platform at once, to `to`; `(platform id, status)` each.
async fn push_tickets(s: &Sandbox, to: &str) -> Vec<(String, String)> {
    let pushes = (0..s.accounts.platforms.len()).map(|i| async move {
        let ticket = super::open_platform::new_ticket(s, i);
        let event = Event::VerifyTicket {
            ticket,
            create_time: now() / 1000,
        };
        let status = push(s, i, &event, to).await;
        (s.accounts.platforms[i].id.clone(), status)
    });
    futures_util::future::join_all(pushes).await
}

/// Pushes tickets every `interval`, the first right away, while there is a push URL, until the
/// sandbox stops.
pub(super) async fn tickets_every(s: Shared, interval: Duration) {
    let mut stop = s.stop.clone();
    loop {
        if let Some(to) = s.pusher.target() {
            push_tickets(&s, &to).await;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Pushes `event` for the platform at `platform` in the background, when there is a push URL;
/// says on standard error when there is none.
pub(super) fn event(s: &Shared, platform: usize, event: Event) {
    let Some(to) = target(s, platform, &event) else {
        return;
    };
    let s = s.clone();
    tokio::spawn(async move {
        push(&s, platform, &event, &to).await;
    });
}

/// The same, pushed before it returns: the receiver has answered (or failed to) by then.
pub(super) async fn event_now(s: &Shared, platform: usize, event: Event) {
    if let Some(to) = target(s, platform, &event) {
        push(s, platform, &event, &to).await;
    }
}

/// Where events are pushed; none (and a note saying so) without a push URL.
fn target(s: &Shared, platform: usize, event: &Event) -> Option<String> {
    let to = s.pusher.target();
    if to.is_none() {
        eprintln!(
            "{}",
            escape(&format!(
                "note: the {} event for {} was not pushed: there is no push URL (start the sandbox with --push-tickets-to URL, or POST /_sandbox/tickets {{\"to\": URL}})",
                event.info_type(),
                s.accounts.platforms[platform].id
            ))
        );
    }
    to
}

/// `POST /_sandbox/tickets` (optional JSON `{"to": URL}`): a ticket to every platform, now.
pub(super) async fn tickets_now(State(s): State<Shared>, body: Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let given = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(mut o)) => match o.remove("to") {
                None | Some(Value::Null) if o.is_empty() => None,
                Some(Value::String(to)) if o.is_empty() => Some(to),
                _ => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "the body must be empty or {\"to\": \"URL\"} (`{platform}` in the URL is replaced by each platform's id)",
                    );
                }
            },
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "the body must be empty or a JSON object {\"to\": \"URL\"}",
                );
            }
        }
    };
    if let Some(to) = given {
        if let Err(e) = check_url(&to) {
            return problem(StatusCode::BAD_REQUEST, e);
        }
        s.pusher.set_target(to);
    }
    let Some(to) = s.pusher.target() else {
        return problem(
            StatusCode::BAD_REQUEST,
            "there is no push URL yet: give {\"to\": \"URL\"} (e.g. the daemon's http://127.0.0.1:8640/wechat/platforms/{platform}/events), or start the sandbox with --push-tickets-to URL",
        );
    };
    if s.accounts.platforms.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "the sandbox plays no open platform: add a wechat_open_platform file to its --dir and start it again",
        );
    }
    let pushed: Vec<Value> = push_tickets(&s, &to)
        .await
        .into_iter()
        .map(|(platform, status)| json!({ "platform": platform, "status": status }))
        .collect();
    json_answer(StatusCode::OK, JSON, &json!({ "pushed": pushed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_urls_name_the_platform_and_must_be_http() {
        assert_eq!(
            url_for(
                "http://127.0.0.1:1/wechat/platforms/{platform}/events",
                "op"
            ),
            "http://127.0.0.1:1/wechat/platforms/op/events"
        );
        assert!(check_url("http://127.0.0.1:1/wechat/platforms/{platform}/events").is_ok());
        assert!(check_url("https://example.com/events").is_ok());
        assert!(
            check_url("ftp://example.com/x")
                .unwrap_err()
                .contains("http(s)")
        );
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn the_plain_signature_is_wechats() {
        // As wechatpy's `check_signature("TOKEN", sig, "1409304348", "xxxxxx")` accepts it.
        assert_eq!(
            plain_signature("TOKEN", "1409304348", "xxxxxx"),
            "7c88670dfa52c16cf3a0550138520a59c9990f70"
        );
    }
}
