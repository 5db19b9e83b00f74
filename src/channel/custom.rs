//! The custom touchpoint's wire format (DESIGN.md, "Custom touchpoint request"): one POST per
//! batch with a Bearer token, Standard Webhooks signature headers when the touchpoint has a signing
//! secret, and a JSON body of the campaign's template params and the batch's recipients. The
//! answer decides the batch's fate: 2xx delivered (except the recipients a `failed` list names),
//! 408/429/5xx and network errors retried, other statuses final. A 2xx whose `failed` list cannot
//! be read (not a list, an entry without a string `user_id`, a JSON body cut off or broken) is a
//! malformed answer: the batch is retried whole, since which recipients failed is unknown. A 2xx
//! body that is not a JSON object (empty, "OK") is no `failed` list at all: delivered.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use super::answer::{describe, excerpt, parse_retry_after, read_capped};
use super::{Channel, Miss, Outgoing, Report, Rest, Unavailable};
use crate::model::{CustomSpec, ParamType, Retry, Secret, SecretPolicy, TemplateParam};

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

/// The request body of one batch, its recipients written as [`super::recipients`] writes them.
pub fn body_with(env: &Envelope<'_>, recipients: &[u8]) -> Vec<u8> {
    let mut out = head(env, recipients.len());
    out.extend_from_slice(recipients);
    out.extend_from_slice(b"]}");
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
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    let (text, cut) = read_capped(response, MAX_RESPONSE).await;
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

/// A live custom touchpoint: its settings and resolved secrets.
pub struct CustomChannel {
    spec: CustomSpec,
    token: Secret,
    signing_key: Option<Vec<u8>>,
}

impl CustomChannel {
    /// A channel with these secrets already resolved.
    pub fn new(spec: CustomSpec, token: Secret, signing_key: Option<Vec<u8>>) -> Self {
        Self {
            spec,
            token,
            signing_key,
        }
    }

    /// Resolves the touchpoint's secrets (file references relative to `base`).
    pub fn open(
        spec: &CustomSpec,
        base: &std::path::Path,
        policy: &SecretPolicy,
    ) -> Result<Self, Unavailable> {
        let token = spec.auth_token.resolve(base, policy).map_err(|e| {
            Unavailable(format!("cannot read `auth_token` {}: {e}", spec.auth_token))
        })?;
        let signing_key = match &spec.signing_secret {
            None => None,
            Some(r) => {
                let s = r
                    .resolve(base, policy)
                    .map_err(|e| Unavailable(format!("cannot read `signing_secret` {r}: {e}")))?;
                Some(
                    signing_key(&s)
                        .map_err(|e| Unavailable(format!("`signing_secret` {r}: {e}")))?,
                )
            }
        };
        Ok(Self {
            spec: spec.clone(),
            token,
            signing_key,
        })
    }
}

impl Channel for CustomChannel {
    fn batch_size(&self) -> usize {
        (self.spec.batch_size as usize).max(1)
    }

    fn endpoint(&self) -> &str {
        &self.spec.url
    }

    fn retry(&self) -> Retry {
        self.spec.retry.clone()
    }

    fn rate_limit(&self) -> Option<f64> {
        self.spec.rate_limit.map(|r| r.per_second())
    }

    fn check(
        &self,
        message: &super::Message,
        params: &Map<String, Value>,
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if message.template.is_some() {
            problems.push(
                "`template` names a template, but a custom touchpoint has none: give its template params in `template_params`"
                    .to_string(),
            );
        }
        for (field, given) in [
            ("title", &message.title),
            ("body", &message.body),
            ("payload", &message.payload),
        ] {
            if given.is_some() {
                problems.push(format!(
                    "`{field}` is for app push touchpoints; a custom touchpoint takes its text in `template_params`"
                ));
            }
        }
        if let Err(more) = check_template_params(&self.spec.template_params, params) {
            problems.extend(more);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn send<'a>(&'a self, batch: Outgoing<'a>) -> BoxFuture<'a, Report> {
        Box::pin(async move {
            let env = Envelope {
                touchpoint: batch.touchpoint,
                campaign: batch.campaign,
                dispatch_id: batch.dispatch_id,
                index: batch.index,
                count: batch.count,
                template: batch.template_params,
            };
            let response = send(
                batch.client,
                Request {
                    url: &self.spec.url,
                    token: &self.token,
                    signing_key: self.signing_key.as_deref(),
                    msg_id: batch.batch_id,
                    body: body_with(&env, batch.recipients),
                    timeout: self.spec.timeout.get(),
                },
            )
            .await;
            report(response)
        })
    }
}

/// What an answer means for the batch's recipients.
fn report(response: Response) -> Report {
    match response {
        Response::Accepted { status, failed } => Report {
            status: Some(status),
            error: None,
            misses: failed
                .into_iter()
                .map(|f| Miss {
                    user_id: f.user_id,
                    retry: f.retry,
                    reason: if f.reason.is_empty() {
                        "refused by the endpoint".into()
                    } else {
                        f.reason
                    },
                })
                .collect(),
            rest: Rest::Delivered,
            signal: None,
        },
        Response::Retryable {
            status,
            retry_after,
            error,
        } => Report::retry(status, retry_after, error),
        Response::Final { status, error } => Report::dead(status, error),
    }
}

/// Checks a trigger's template params against the touchpoint's declarations; every problem is
/// named. Values of undeclared names are refused too: a typo must not be sent silently.
pub fn check_template_params(
    decls: &[TemplateParam],
    given: &Map<String, Value>,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for d in decls {
        match given.get(&d.name) {
            None | Some(Value::Null) if d.required => problems.push(format!(
                "template param `{}` is required{}",
                d.name,
                d.description
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            )),
            None | Some(Value::Null) => {}
            Some(v) => {
                if let Err(p) = check_value(d, v) {
                    problems.push(p);
                }
            }
        }
    }
    let declared: HashSet<&str> = decls.iter().map(|d| d.name.as_str()).collect();
    for name in given.keys().filter(|k| !declared.contains(k.as_str())) {
        let names: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
        let hint = match crate::load::did_you_mean(name, names.iter().copied()) {
            Some(near) => format!("; did you mean `{near}`?"),
            None if names.is_empty() => "; the touchpoint declares none".to_string(),
            None => format!("; it declares {}", quoted(&names)),
        };
        problems.push(format!(
            "`{name}` is not a template param of this touchpoint{hint}"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_value(d: &TemplateParam, v: &Value) -> Result<(), String> {
    let name = &d.name;
    let found = || match v {
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        Value::Null => "null",
    };
    let ok = match d.kind {
        ParamType::String | ParamType::Url => v.is_string(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::Number => v.is_number(),
        ParamType::Boolean => v.is_boolean(),
    };
    if !ok {
        let want = match d.kind {
            ParamType::String => "a string",
            ParamType::Url => "a URL string",
            ParamType::Integer => "an integer",
            ParamType::Number => "a number",
            ParamType::Boolean => "true or false",
        };
        return Err(format!(
            "template param `{name}` must be {want}, found {}",
            found()
        ));
    }
    if let Value::String(s) = v {
        if let Some(max) = d.max_length {
            let len = s.chars().count();
            if len > max as usize {
                return Err(format!(
                    "template param `{name}` is {len} characters long; it takes at most {max}"
                ));
            }
        }
        if d.kind == ParamType::Url {
            let good = url::Url::parse(s)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !good {
                return Err(format!(
                    "template param `{name}` must be an absolute http(s) URL, found {s:?}"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl(name: &str, kind: ParamType, required: bool, max: Option<u32>) -> TemplateParam {
        TemplateParam {
            name: name.into(),
            kind,
            required,
            max_length: max,
            description: None,
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

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
        let env = Envelope {
            touchpoint: "sms",
            campaign: "spring",
            dispatch_id: "dsp_1",
            index: 0,
            count: 4,
            template: r#"{"text":"hi"}"#,
        };
        let recipients =
            br#"{"user_id":"u1","phone":"13800000000"},{"user_id":"u2","phone":"139"}"#;
        let v: serde_json::Value = serde_json::from_slice(&body_with(&env, recipients)).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "touchpoint.dispatch", "touchpoint": "sms", "campaign": "spring",
                "dispatch_id": "dsp_1", "batch": {"index": 0, "count": 4},
                "template": {"text": "hi"},
                "recipients": [{"user_id": "u1", "phone": "13800000000"}, {"user_id": "u2", "phone": "139"}]
            })
        );
        let empty = Envelope {
            template: "",
            ..env
        };
        let v: serde_json::Value = serde_json::from_slice(&body_with(&empty, b"")).unwrap();
        assert_eq!(v["template"], json!({}));
        assert_eq!(v["recipients"], json!([]));
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

    #[test]
    fn template_params_are_checked_and_every_problem_named() {
        let decls = [
            decl("text", ParamType::String, true, Some(5)),
            decl("link", ParamType::Url, false, None),
            decl("points", ParamType::Integer, false, None),
        ];
        assert!(check_template_params(&decls, &map(json!({"text": "hi"}))).is_ok());
        let problems = check_template_params(
            &decls,
            &map(json!({"link": "ftp://x", "points": 1.5, "txt": "hi"})),
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "template param `text` is required",
                "template param `link` must be an absolute http(s) URL, found \"ftp://x\"",
                "template param `points` must be an integer, found a number",
                "`txt` is not a template param of this touchpoint; did you mean `text`?",
            ]
        );
        let long =
            check_template_params(&decls, &map(json!({"text": "短信内容太长了"}))).unwrap_err();
        assert_eq!(
            long,
            ["template param `text` is 7 characters long; it takes at most 5"]
        );
    }
}
