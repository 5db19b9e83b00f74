//! The custom touchpoint's wire format (DESIGN.md, "Custom touchpoint request"): one POST per
//! batch with a Bearer token, Standard Webhooks signature headers when the touchpoint has a signing
//! secret, and a JSON body of the campaign's template params and the batch's recipients. The
//! answer decides the batch's fate: 2xx delivered (except the recipients a `failed` list names),
//! 408/429/5xx and network errors retried, other statuses final. A 2xx whose `failed` list cannot
//! be read (not a list, an entry without a string `user_id`, a JSON body cut off or broken) is a
//! malformed answer: the batch is retried whole, since which recipients failed is unknown. A 2xx
//! body that is not a JSON object (empty, "OK") is no `failed` list at all: delivered.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};

use crate::dispatch::user::{Mapping, UserRef};
use crate::model::Secret;

/// The most of a response body read (the `failed` list of a batch of 500 fits easily).
const MAX_RESPONSE: usize = 1024 * 1024;

/// The key a Standard Webhooks signing secret stands for: `whsec_` followed by base64 (the prefix
/// is optional), as the reference libraries read it.
pub fn signing_key(secret: &Secret) -> Result<Vec<u8>, String> {
    let text = secret.expose().trim();
    let b64 = text.strip_prefix("whsec_").unwrap_or(text);
    BASE64.decode(b64).map_err(|_| {
        "the signing secret is not a Standard Webhooks secret: it must be `whsec_` followed by base64 (e.g. `whsec_` + 24 random bytes in base64)".to_string()
    })
}

/// The `webhook-signature` header value for a message: `v1,` and the base64 HMAC-SHA256 of
/// `{id}.{timestamp}.{body}`.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// What the request body needs besides the recipients.
pub struct Envelope<'a> {
    /// The touchpoint id.
    pub touchpoint: &'a str,
    /// The campaign.
    pub campaign: &'a str,
    /// The dispatch.
    pub dispatch_id: &'a str,
    /// This batch's index in the dispatch.
    pub index: u32,
    /// How many batches the dispatch has.
    pub count: u32,
    /// The template params, as stored (a JSON object).
    pub template: &'a str,
}

/// The request body of one batch.
pub fn body(env: &Envelope<'_>, users: &[UserRef<'_>], mapping: &Mapping) -> Vec<u8> {
    let mut out = head(env, users.len() * 96);
    write_recipients(&mut out, users.iter(), mapping);
    out.extend_from_slice(b"]}");
    out
}

/// The request body of one batch whose recipients were written already (see [`recipients`]).
pub fn body_with(env: &Envelope<'_>, recipients: &[u8]) -> Vec<u8> {
    let mut out = head(env, recipients.len());
    out.extend_from_slice(recipients);
    out.extend_from_slice(b"]}");
    out
}

/// A batch's recipients as [`body`] writes them, to pass to [`body_with`] later.
pub fn recipients<'a, 'b: 'a>(users: &[&'a UserRef<'b>], mapping: &Mapping) -> Vec<u8> {
    let mut out = Vec::with_capacity(users.len() * 96);
    write_recipients(&mut out, users.iter().copied(), mapping);
    out
}

/// Everything up to the first recipient, with room for `more` bytes after it.
fn head(env: &Envelope<'_>, more: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + env.template.len() + more);
    let string = |out: &mut Vec<u8>, s: &str| {
        // Writing a string to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    };
    out.extend_from_slice(b"{\"type\":\"touchpoint.dispatch\",\"touchpoint\":");
    string(&mut out, env.touchpoint);
    out.extend_from_slice(b",\"campaign\":");
    string(&mut out, env.campaign);
    out.extend_from_slice(b",\"dispatch_id\":");
    string(&mut out, env.dispatch_id);
    out.extend_from_slice(
        format!(
            ",\"batch\":{{\"index\":{},\"count\":{}}},\"template\":",
            env.index, env.count
        )
        .as_bytes(),
    );
    let template = env.template.trim();
    out.extend_from_slice(if template.is_empty() {
        b"{}"
    } else {
        template.as_bytes()
    });
    out.extend_from_slice(b",\"recipients\":[");
    out
}

fn write_recipients<'a, 'b: 'a>(
    out: &mut Vec<u8>,
    users: impl Iterator<Item = &'a UserRef<'b>>,
    mapping: &Mapping,
) {
    for (i, user) in users.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        user.write_recipient(out, mapping);
    }
}

/// A recipient the endpoint reports as failed in a 2xx answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedRecipient {
    /// The user.
    pub user_id: String,
    /// Why, as the endpoint says.
    pub reason: String,
    /// Whether sending it again may succeed.
    pub retry: bool,
}

/// The `failed` list of a 2xx answer: empty when the body is not a JSON object or has no list,
/// or what is wrong with it. `cut` says the body was longer than [`MAX_RESPONSE`] and cut there.
fn failed_list(body: &[u8], cut: bool) -> Result<Vec<FailedRecipient>, String> {
    let text = body.trim_ascii();
    if !text.starts_with(b"{") {
        return Ok(Vec::new());
    }
    if cut {
        return Err(format!(
            "the answer is longer than {} KiB, so its `failed` list cannot be read whole",
            MAX_RESPONSE / 1024
        ));
    }
    let answer: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(text)
        .map_err(|e| format!("the answer starts like a JSON object but is not valid JSON ({e})"))?;
    let list = match answer.get("failed") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list,
        Some(other) => {
            return Err(format!(
                "`failed` is {}, not a list of {{ \"user_id\", \"reason\", \"retry\" }} entries",
                json_kind(other)
            ));
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let serde_json::Value::Object(entry) = entry else {
            return Err(format!(
                "`failed[{i}]` is {}, not an object with a `user_id`",
                json_kind(entry)
            ));
        };
        let user_id = match entry.get("user_id") {
            Some(serde_json::Value::String(id)) if !id.is_empty() => id.clone(),
            Some(serde_json::Value::String(_)) => {
                return Err(format!("`failed[{i}].user_id` is empty"));
            }
            None => return Err(format!("`failed[{i}]` has no `user_id`")),
            Some(other) => {
                return Err(format!(
                    "`failed[{i}].user_id` is {}, not a string",
                    json_kind(other)
                ));
            }
        };
        let reason = match entry.get("reason") {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(r)) => r.clone(),
            Some(other) => {
                return Err(format!(
                    "`failed[{i}].reason` is {}, not a string",
                    json_kind(other)
                ));
            }
        };
        let retry = match entry.get("retry") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "`failed[{i}].retry` is {}, not true or false",
                    json_kind(other)
                ));
            }
        };
        out.push(FailedRecipient {
            user_id,
            reason,
            retry,
        });
    }
    Ok(out)
}

/// What a JSON value is, for messages (never the value itself: it comes from the endpoint).
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// What the endpoint made of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// 2xx: every recipient except those listed is delivered.
    Accepted {
        /// The status.
        status: u16,
        /// Recipients the endpoint could not take.
        failed: Vec<FailedRecipient>,
    },
    /// Worth trying again: network error, timeout, 408, 429, 5xx.
    Retryable {
        /// The status, if a response came.
        status: Option<u16>,
        /// The endpoint's `Retry-After`.
        retry_after: Option<Duration>,
        /// What went wrong.
        error: String,
    },
    /// Will not succeed as it is: any other status, or a refused address.
    Final {
        /// The status, if a response came.
        status: Option<u16>,
        /// What went wrong.
        error: String,
    },
}

/// Everything one request needs.
pub struct Request<'a> {
    /// The endpoint.
    pub url: &'a str,
    /// The Bearer token.
    pub token: &'a Secret,
    /// The Standard Webhooks key, when the touchpoint signs.
    pub signing_key: Option<&'a [u8]>,
    /// The batch id (`webhook-id`).
    pub msg_id: &'a str,
    /// The body.
    pub body: Vec<u8>,
    /// The touchpoint's timeout.
    pub timeout: Duration,
}

/// Sends one batch.
pub async fn send(client: &reqwest::Client, req: Request<'_>) -> Response {
    let timestamp = crate::store::now_ms() / 1000;
    let mut builder = client
        .post(req.url)
        .timeout(req.timeout)
        .bearer_auth(req.token.expose())
        .header("content-type", "application/json")
        .header("webhook-id", req.msg_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(key) = req.signing_key {
        builder = builder.header(
            "webhook-signature",
            sign(key, req.msg_id, timestamp, &req.body),
        );
    }
    let response = match builder.body(req.body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Response::Retryable {
                status: None,
                retry_after: None,
                error: describe(&e, req.timeout),
            };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::dispatch::retry::parse_retry_after(v, std::time::SystemTime::now()));
    let (text, cut) = read_capped(response).await;
    match status {
        200..=299 => match failed_list(&text, cut) {
            Ok(failed) => Response::Accepted { status, failed },
            Err(problem) => Response::Retryable {
                status: Some(status),
                retry_after,
                error: format!(
                    "HTTP {status} with a malformed answer: {problem}; which recipients failed is unknown, so the whole batch is tried again (the answer must be empty, not JSON, or a JSON object whose `failed` is a list of {{ \"user_id\": string, \"reason\": string, \"retry\": boolean }})"
                ),
            },
        },
        408 | 429 | 500..=599 => Response::Retryable {
            status: Some(status),
            retry_after,
            error: format!("HTTP {status}{}", excerpt(&text)),
        },
        300..=399 => Response::Final {
            status: Some(status),
            error: format!(
                "HTTP {status}: the endpoint redirects, and touchctl does not follow redirects with recipients' data; set `url` to the final address"
            ),
        },
        _ => Response::Final {
            status: Some(status),
            error: format!("HTTP {status}{}", excerpt(&text)),
        },
    }
}

/// The body, up to [`MAX_RESPONSE`], and whether there was more.
async fn read_capped(mut response: reqwest::Response) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_RESPONSE.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            return (out, true);
        }
    }
    (out, false)
}

/// The start of an error body, for the attempt log.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let cut: String = text.chars().take(200).collect();
    let more = if cut.len() < text.len() { "…" } else { "" };
    format!(": {cut}{more}")
}

fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {}", humantime::format_duration(timeout));
    }
    let mut text = if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        let key = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(signing_key(&Secret::new("not base64!")).is_err());
    }

    #[test]
    fn body_has_the_documented_shape() {
        let mut params = crate::model::DynamicParams::new();
        params.insert(
            "phone".into(),
            crate::model::ParamSource::Attribute("user.phone".into()),
        );
        let stored = r#"[{"user_id":"u1","attributes":{"phone":"13800000000","tier":"gold"}}]"#;
        let users = crate::dispatch::user::parse_users_json(stored.as_bytes()).unwrap();
        let env = Envelope {
            touchpoint: "sms",
            campaign: "spring",
            dispatch_id: "dsp_1",
            index: 0,
            count: 4,
            template: r#"{"text":"hi"}"#,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&body(&env, &users, &Mapping::new(&params))).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "touchpoint.dispatch", "touchpoint": "sms", "campaign": "spring",
                "dispatch_id": "dsp_1", "batch": {"index": 0, "count": 4},
                "template": {"text": "hi"},
                "recipients": [{"user_id": "u1", "phone": "13800000000"}]
            })
        );
    }

    #[test]
    fn recipients_written_ahead_make_the_same_body() {
        let mut params = crate::model::DynamicParams::new();
        params.insert(
            "phone".into(),
            crate::model::ParamSource::Attribute("user.phone".into()),
        );
        let mapping = Mapping::new(&params);
        let stored = r#"[{"user_id":"u1","attributes":{"phone":"138"}},{"user_id":"u\"2","attributes":{"phone":null}},{"user_id":"u3","attributes":{"phone":{"a":1}}}]"#;
        let users = crate::dispatch::user::parse_users_json(stored.as_bytes()).unwrap();
        let env = Envelope {
            touchpoint: "sms",
            campaign: "spring",
            dispatch_id: "dsp_1",
            index: 2,
            count: 3,
            template: "",
        };
        let refs: Vec<_> = users.iter().collect();
        let ahead = body_with(&env, &recipients(&refs, &mapping));
        assert_eq!(
            String::from_utf8(ahead).unwrap(),
            String::from_utf8(body(&env, &users, &mapping)).unwrap()
        );
        assert_eq!(
            body_with(&env, &recipients(&[], &mapping)),
            body(&env, &[], &mapping)
        );
    }

    #[test]
    fn a_2xx_with_an_invalid_failed_list_is_a_malformed_answer() {
        for (body, problem) in [
            (r#"{"failed": "all"}"#, "`failed` is a string, not a list"),
            (
                r#"{"failed": {"user_id": "u1"}}"#,
                "`failed` is an object, not a list",
            ),
            (
                r#"{"failed": ["u1"]}"#,
                "`failed[0]` is a string, not an object",
            ),
            (
                r#"{"failed": [{"id": "u1"}]}"#,
                "`failed[0]` has no `user_id`",
            ),
            (
                r#"{"failed": [{"user_id": 7}]}"#,
                "`failed[0].user_id` is a number, not a string",
            ),
            (
                r#"{"failed": [{"user_id": ""}]}"#,
                "`failed[0].user_id` is empty",
            ),
            (
                r#"{"failed": [{"user_id": "u1"}, {"user_id": "u2", "retry": "yes"}]}"#,
                "`failed[1].retry` is a string, not true or false",
            ),
            (
                r#"{"failed": [{"user_id": "u1", "reason": ["busy"]}]}"#,
                "`failed[0].reason` is a list, not a string",
            ),
            (r#"{"failed": [{"user_id": "u1""#, "not valid JSON"),
        ] {
            let err = failed_list(body.as_bytes(), false).unwrap_err();
            assert!(err.contains(problem), "{body}: {err}");
        }
        let err = failed_list(br#"{"failed": []}"#, true).unwrap_err();
        assert!(err.contains("longer than 1024 KiB"), "{err}");
    }

    #[test]
    fn a_2xx_without_a_failed_list_delivers_everyone_and_a_valid_list_is_read() {
        for body in [
            "",
            "  ",
            "OK",
            "[]",
            "{}",
            r#"{"failed": null}"#,
            r#"{"ok": true}"#,
        ] {
            assert_eq!(
                failed_list(body.as_bytes(), false),
                Ok(Vec::new()),
                "{body}"
            );
        }
        // A long answer that is not a JSON object is no list, whether it was cut or not.
        assert_eq!(failed_list(b"<html>", true), Ok(Vec::new()));
        let list = failed_list(
            br#"{"failed": [{"user_id": "u1", "reason": "busy", "retry": true, "code": 17}, {"user_id": "u2", "reason": null}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            list,
            vec![
                FailedRecipient {
                    user_id: "u1".into(),
                    reason: "busy".into(),
                    retry: true
                },
                FailedRecipient {
                    user_id: "u2".into(),
                    reason: String::new(),
                    retry: false
                },
            ]
        );
    }
}
