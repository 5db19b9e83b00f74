//! The webhook sink for custom touchpoints: `POST /_sandbox/webhooks/NAME` receives what a custom
//! touchpoint whose url has that path is sent (DESIGN.md, "Custom touchpoint request").
//!
//! It answers 401 unless `Authorization: Bearer` carries the touchpoint's `auth_token` and, when
//! the touchpoint has a `signing_secret`, unless the Standard Webhooks headers verify
//! (`webhook-signature` holds a `v1,` HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`
//! and the timestamp is within [`TOLERANCE_SECS`] of now). Then 200 `{}`, or 200 with a `failed` list
//! for the recipients a fault fails (`"retry": false`, `"reason": "code N"`); 400 for a body that
//! is not JSON. A `webhook-id` seen before (within a day) answers 200 `{}` again and is logged
//! `duplicate`. A rate-limit fault answers 429 with `Retry-After: 1`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::faults::{Endpoint, Refusal};
use super::messages::{Entry, Failed, Kind};
use super::{Channel, JSON, Shared, json_answer, lock, now, receive, same_secret, status_page};
use crate::channel::custom::sign;

/// How far a signature's timestamp may be from now (the Standard Webhooks libraries' default).
const TOLERANCE_SECS: i64 = 300;

fn answer(entry: &mut Entry, status: StatusCode, body: &Value) -> Response {
    entry.answer.http_status = status.as_u16();
    entry.answer.code = None;
    json_answer(status, JSON, body)
}

/// `POST /_sandbox/webhooks/{name}`.
pub(super) async fn webhook(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = format!("{}{name}", super::accounts::SINK_PREFIX);
    let (mut entry, body) = match receive(&s, Channel::Custom, Kind::Message, &endpoint, body).await
    {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = webhook_answer(&s, &name, &headers, &body, &mut entry).await;
    s.record(entry);
    answer
}

async fn webhook_answer(
    s: &Shared,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    entry: &mut Entry,
) -> Response {
    let candidates: Vec<usize> = (0..s.accounts.sinks.len())
        .filter(|&i| s.accounts.sinks[i].name == name)
        .collect();
    if candidates.is_empty() {
        return answer(
            entry,
            StatusCode::NOT_FOUND,
            &json!({ "error": format!(
                "no custom touchpoint the sandbox serves has the url path {}{name}: check the touchpoint's url, and that the sandbox was started on its folder",
                super::accounts::SINK_PREFIX
            ) }),
        );
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let matched = bearer.and_then(|b| {
        candidates
            .iter()
            .copied()
            .find(|&i| same_secret(b, &s.accounts.sinks[i].auth_token))
    });
    let only = (candidates.len() == 1).then(|| candidates[0]);
    entry.touchpoint = matched.or(only).and_then(|i| s.name(Channel::Custom, i));
    entry.recipients = recipients(body);
    let Some(i) = matched else {
        return answer(
            entry,
            StatusCode::UNAUTHORIZED,
            &json!({ "error": if bearer.is_none() {
                "no `Authorization: Bearer <auth_token>` header"
            } else {
                "the Bearer token is not the touchpoint's auth_token"
            } }),
        );
    };
    if let Some(key) = &s.accounts.sinks[i].signing_key
        && let Err(why) = verify(key, headers, body, now() / 1000)
    {
        return answer(entry, StatusCode::UNAUTHORIZED, &json!({ "error": why }));
    }
    let recipients = entry.recipients.clone();
    let verdict = s.faults(entry, Endpoint::Send, &recipients).await;
    match verdict.refuse {
        Some(Refusal::RateLimit(_)) => {
            let mut r = answer(
                entry,
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "error": "rate limited (a sandbox fault): retry after a second" }),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Some(Refusal::Error { http_status, .. }) => {
            let status = http_status
                .and_then(|st| StatusCode::from_u16(st).ok())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            entry.answer.http_status = status.as_u16();
            entry.answer.code = None;
            return status_page(status);
        }
        None => {}
    }
    if serde_json::from_slice::<Value>(body).is_err() {
        return answer(
            entry,
            StatusCode::BAD_REQUEST,
            &json!({ "error": "the body is not JSON" }),
        );
    }
    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok())
        && lock(&s.webhooks)
            .first_or_remember((i, id.to_string()), (), now())
            .is_some()
    {
        entry.duplicate = true;
        return answer(entry, StatusCode::OK, &json!({}));
    }
    let mut failed = Vec::new();
    for r in &recipients {
        match verdict.failed.get(r) {
            Some(&code) => {
                failed.push(
                    json!({ "user_id": r, "reason": format!("code {code}"), "retry": false }),
                );
                entry.failed.push(Failed {
                    id: r.clone(),
                    code: Some(code),
                });
            }
            None => entry.delivered.push(r.clone()),
        }
    }
    if failed.is_empty() {
        answer(entry, StatusCode::OK, &json!({}))
    } else {
        answer(entry, StatusCode::OK, &json!({ "failed": failed }))
    }
}

/// The `user_id`s of the body's `recipients`.
fn recipients(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Batch {
        #[serde(default)]
        recipients: Vec<Recipient>,
    }
    #[derive(serde::Deserialize)]
    struct Recipient {
        user_id: Option<String>,
    }
    serde_json::from_slice::<Batch>(body)
        .map(|b| b.recipients.into_iter().filter_map(|r| r.user_id).collect())
        .unwrap_or_default()
}

/// Checks the Standard Webhooks headers at `now` (unix seconds); the reason a request fails.
fn verify(key: &[u8], headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sigs)) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    ) else {
        return Err(
            "the touchpoint has a signing_secret, and the request lacks webhook-id, webhook-timestamp or webhook-signature"
                .into(),
        );
    };
    let ts: i64 = ts
        .trim()
        .parse()
        .map_err(|_| format!("webhook-timestamp {ts:?} is not unix seconds"))?;
    if ts.saturating_sub(now).abs() > TOLERANCE_SECS {
        return Err(format!(
            "webhook-timestamp {ts} is more than {TOLERANCE_SECS} s from the sandbox's clock ({now})"
        ));
    }
    let expected = sign(key, id, ts, body);
    let ok = sigs.split_whitespace().any(|given| {
        use subtle::ConstantTimeEq;
        given.as_bytes().ct_eq(expected.as_bytes()).into()
    });
    if ok {
        Ok(())
    } else {
        Err("webhook-signature does not verify with the touchpoint's signing_secret".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, ts: i64, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        h
    }

    #[test]
    fn signatures_verify_within_the_tolerance() {
        let key = b"0123456789abcdef";
        let body = br#"{"recipients":[]}"#;
        let good = sign(key, "msg_1", 1000, body);
        assert_eq!(
            verify(key, &headers("msg_1", 1000, &good), body, 1000),
            Ok(())
        );
        // Several signatures, one of them right (key rotation).
        let two = format!("v1,bm9wZQ== {good}");
        assert_eq!(
            verify(key, &headers("msg_1", 1000, &two), body, 1300),
            Ok(())
        );
        let e = verify(key, &headers("msg_1", 1000, &good), body, 1301).unwrap_err();
        assert!(e.contains("more than 300 s"), "{e}");
        let e = verify(key, &headers("msg_2", 1000, &good), body, 1000).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = verify(key, &headers("msg_1", 1000, &good), b"{}", 1000).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = verify(key, &HeaderMap::new(), body, 1000).unwrap_err();
        assert!(e.contains("lacks webhook-id"), "{e}");
    }

    #[test]
    fn recipients_are_read_from_the_batch() {
        assert_eq!(
            recipients(br#"{"recipients":[{"user_id":"u1","phone":"1"},{"user_id":"u2"}]}"#),
            ["u1", "u2"]
        );
        assert!(recipients(b"not json").is_empty());
    }
}
