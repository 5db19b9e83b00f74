//! Getui push v2 (个推, CHANNELS.md section 4): an `app_push` touchpoint with `provider = "getui"`.
//!
//! A batch is one notification for all its recipients, sent in two requests under
//! `{api_base}/v2/{app_id}`:
//! 1. `POST /push/list/message` creates the push task: `request_id` (derived from the batch id, see
//!    [`request_id`]: the same on every attempt, so a retry is answered with the first task and
//!    never makes a second one), `settings.ttl` from the spec's `ttl`, and `push_message.notification`
//!    with the trigger's (or the spec's default) `title` and `body`, `click_type` `none`, or
//!    `payload` with the trigger's `payload`. The answer names the `taskid`.
//! 2. `POST /push/list/cid` pushes that task to the batch's cids (each once, however many users
//!    share a device), synchronously (`is_async: false`), so the answer gives each cid's status:
//!    `successed_*` is delivered, anything else fails the users of that cid for good, with the
//!    status as the reason (`target user is invalid` with its code, 20001, as when Getui refuses a
//!    whole list so). Pushing the same task to a cid again does not deliver it twice.
//!
//! Every request carries the app's token in the `token` header, from `POST /auth` (`sign` = hex
//! SHA-256 of app key, timestamp and master secret), kept in the shared [`super::token::Tokens`]
//! until shortly before its `expire_time` and fetched again once when Getui answers 10001, the
//! request then sent once more.
//!
//! Answers are read by their `code` (HTTP status alone when the body is not Getui's JSON), see
//! [`reaction`]: a rejected configuration (bad credentials, blacklisted app or IP, plan limits)
//! holds the touchpoint; per-minute limits make it wait to the next minute and daily totals to the
//! next midnight in China (UTC+8); busy answers, 5xx, network errors and unreadable answers are
//! retried; a message Getui refuses as invalid is dead-lettered (replayable once fixed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::answer::{describe, read_capped, to_next_minute, to_quota_reset};
use super::token::{CredentialKey, Token};
use super::{Channel, Message, Miss, Outgoing, Report, Rest, Shared, Unavailable};
use crate::model::{AppPushSpec, MAX_PUSH_BATCH, Secret, SecretPolicy};
use crate::store::now_ms;

/// The real service's base URL.
pub const DEFAULT_API_BASE: &str = "https://restapi.getui.com";

/// How long one request may take.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// The most of an answer read (the sync answer for 1000 cids is about 60 KiB).
const MAX_ANSWER: usize = 1024 * 1024;

/// The longest notification title Getui takes, in characters.
pub const MAX_TITLE: usize = 50;

/// The longest notification body Getui takes, in characters.
pub const MAX_BODY: usize = 256;

/// The longest `payload` Getui takes, in characters.
pub const MAX_PAYLOAD: usize = 3072;

/// The recipient field holding the device's client id.
const CID: &str = "cid";

/// The status (and 20001 message) of a cid that is not a device of this app.
const INVALID_TARGET: &str = "target user is invalid";

/// A live Getui touchpoint: its settings, its master secret and where its requests go.
pub struct GetuiChannel {
    spec: AppPushSpec,
    master_secret: Secret,
    base: String,
    urls: Urls,
    key: CredentialKey,
    shared: Arc<Shared>,
}

/// The three endpoints of an app.
struct Urls {
    auth: String,
    message: String,
    cid: String,
}

/// Which request an answer is to (they differ in what some codes mean).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `POST /auth`.
    Auth,
    /// `POST /push/list/message`.
    Message,
    /// `POST /push/list/cid`.
    Cid,
}

impl Step {
    fn path(self) -> &'static str {
        match self {
            Step::Auth => "auth",
            Step::Message => "push/list/message",
            Step::Cid => "push/list/cid",
        }
    }
}

impl GetuiChannel {
    /// Resolves the master secret (a file reference relative to `base`) and works out the
    /// endpoints.
    pub fn open(
        spec: &AppPushSpec,
        base: &std::path::Path,
        policy: &SecretPolicy,
        shared: &Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        let master_secret = spec.master_secret.resolve(base, policy).map_err(|e| {
            Unavailable(format!(
                "cannot read `master_secret` {}: {e}",
                spec.master_secret
            ))
        })?;
        Self::new(spec.clone(), master_secret, shared.clone())
    }

    /// A channel with its master secret already resolved.
    pub fn new(
        spec: AppPushSpec,
        master_secret: Secret,
        shared: Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        let base = spec
            .api_base
            .clone()
            .unwrap_or_else(|| DEFAULT_API_BASE.to_string());
        let urls = Urls {
            auth: endpoint(&base, &spec.app_id, Step::Auth)?,
            message: endpoint(&base, &spec.app_id, Step::Message)?,
            cid: endpoint(&base, &spec.app_id, Step::Cid)?,
        };
        let key = CredentialKey::of(&[
            b"getui",
            base.as_bytes(),
            spec.app_id.as_bytes(),
            spec.app_key.as_bytes(),
            master_secret.expose().as_bytes(),
        ]);
        Ok(Self {
            spec,
            master_secret,
            base,
            urls,
            key,
            shared,
        })
    }

    /// The app's token: the cached one, or a new one from `auth`.
    async fn token(&self, client: &reqwest::Client) -> Result<Arc<Token>, Reaction> {
        self.shared.tokens.get(self.key, || self.auth(client)).await
    }

    /// `POST /auth`: a new token and how long it serves.
    async fn auth(&self, client: &reqwest::Client) -> Result<(Secret, Duration), Reaction> {
        let now = now_ms();
        let body = auth_body(&self.spec.app_key, &self.master_secret, now);
        let (status, data) = self.post(client, Step::Auth, &body, None).await?;
        let token = data
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty());
        let expire = data.get("expire_time").and_then(|v| match v {
            Value::String(s) => s.trim().parse::<i64>().ok(),
            Value::Number(n) => n.as_i64(),
            _ => None,
        });
        match (token, expire) {
            (Some(token), Some(expire)) => {
                let lifetime = u64::try_from(expire.saturating_sub(now)).unwrap_or(0);
                Ok((Secret::new(token), Duration::from_millis(lifetime)))
            }
            _ => Err(Reaction::Retry {
                status: Some(status),
                error: "Getui's auth answer has no `token` and `expire_time` (as a millisecond timestamp) in its `data`; trying again later".into(),
            }),
        }
    }

    /// One request: `data` of a `code` 0 answer, or what to do about any other.
    async fn post(
        &self,
        client: &reqwest::Client,
        step: Step,
        body: &[u8],
        token: Option<&Secret>,
    ) -> Result<(u16, Map<String, Value>), Reaction> {
        let mut request = client
            .post(match step {
                Step::Auth => &self.urls.auth,
                Step::Message => &self.urls.message,
                Step::Cid => &self.urls.cid,
            })
            .timeout(TIMEOUT)
            .header("content-type", "application/json;charset=utf-8")
            .body(body.to_vec());
        if let Some(token) = token {
            request = request.header("token", token.expose());
        }
        let response = request.send().await.map_err(|e| Reaction::Retry {
            status: None,
            error: format!("{}: {}", step.path(), describe(&e, TIMEOUT)),
        })?;
        let status = response.status().as_u16();
        let (text, cut) = read_capped(response, MAX_ANSWER).await;
        match read_answer(status, &text, cut) {
            Answer::Ok(data) => Ok((status, data)),
            Answer::Refused { code, msg } => Err(reaction(step, status, code, &msg, now_ms())),
            Answer::Unreadable(problem) => Err(Reaction::Retry {
                status: Some(status),
                error: format!(
                    "{}: HTTP {status} with an answer that is not Getui's JSON ({problem}); trying again later",
                    step.path()
                ),
            }),
        }
    }

    /// A request with the app's token, re-authenticated and sent once more if Getui says the
    /// token is no longer valid (10001).
    async fn call(
        &self,
        client: &reqwest::Client,
        step: Step,
        body: &[u8],
    ) -> Result<(u16, Map<String, Value>), Reaction> {
        let token = self.token(client).await?;
        match self.post(client, step, body, Some(&token.value)).await {
            Err(Reaction::Reauth { .. }) => {
                self.shared.tokens.invalidate(self.key, &token).await;
                let fresh = self.token(client).await?;
                match self.post(client, step, body, Some(&fresh.value)).await {
                    Err(Reaction::Reauth { status, msg }) => Err(Reaction::Retry {
                        status: Some(status),
                        error: format!(
                            "{}: Getui refused a token it had just issued (10001 {msg}); trying again later",
                            step.path()
                        ),
                    }),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// The notification of a trigger, with the touchpoint's defaults.
    fn notification(&self, message: &Message) -> Value {
        let title = message.title.as_deref().or(self.spec.title.as_deref());
        let body = message.body.as_deref().or(self.spec.body.as_deref());
        let mut n = json!({
            "title": title.unwrap_or_default(),
            "body": body.unwrap_or_default(),
        });
        match &message.payload {
            Some(payload) => {
                n["click_type"] = json!("payload");
                n["payload"] = json!(payload);
            }
            None => n["click_type"] = json!("none"),
        }
        n
    }

    async fn push(&self, batch: Outgoing<'_>) -> Report {
        let recipients = match batch.parsed_recipients() {
            Ok(r) => r,
            Err(e) => return Report::dead(None, e),
        };
        let Audience {
            cids,
            users,
            misses,
        } = audience(&recipients);
        if cids.is_empty() {
            return Report {
                misses,
                ..Report::delivered(None)
            };
        }
        let message = message_body(
            &request_id(batch.batch_id),
            self.spec.ttl.map(|t| t.get()),
            self.notification(batch.message),
        );
        let (_, data) = match self.call(batch.client, Step::Message, &message).await {
            Ok(answer) => answer,
            Err(r) => return r.report(&users, misses),
        };
        let Some(taskid) = data
            .get("taskid")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        else {
            return Report {
                misses,
                ..Report::retry(
                    None,
                    None,
                    "push/list/message: Getui's answer has no `taskid` in its `data`; trying again later",
                )
            };
        };
        let body = cid_body(taskid, &cids);
        match self.call(batch.client, Step::Cid, &body).await {
            Ok((status, data)) => statuses(status, taskid, &data, &cids, &users, misses),
            Err(r) => r.report(&users, misses),
        }
    }
}

impl Channel for GetuiChannel {
    fn batch_size(&self) -> usize {
        self.spec.batch_size.clamp(1, MAX_PUSH_BATCH) as usize
    }

    fn endpoint(&self) -> &str {
        &self.base
    }

    fn check(&self, message: &Message, params: &Map<String, Value>) -> Result<(), Vec<String>> {
        check(&self.spec, message, params)
    }

    fn send<'a>(&'a self, batch: Outgoing<'a>) -> BoxFuture<'a, Report> {
        Box::pin(self.push(batch))
    }

    fn probe<'a>(&'a self, client: &'a reqwest::Client) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match self.auth(client).await {
                Ok(_) => Ok(format!(
                    "Getui auth succeeded for app `{}`",
                    self.spec.app_id
                )),
                Err(r) => Err(r.describe()),
            }
        })
    }
}

/// `{base}/v2/{app_id}/{path}`, the app id written as one path segment.
fn endpoint(base: &str, app_id: &str, step: Step) -> Result<String, Unavailable> {
    let mut url = url::Url::parse(base).map_err(|e| {
        Unavailable(format!(
            "`api_base` is not a valid URL ({e}): write it as https://host"
        ))
    })?;
    url.path_segments_mut()
        .map_err(|()| {
            Unavailable("`api_base` cannot be a base URL: write it as https://host".into())
        })?
        .pop_if_empty()
        .push("v2")
        .push(app_id)
        .extend(step.path().split('/'));
    Ok(url.into())
}

/// The `auth` request body at `now` (ms since the epoch).
pub fn auth_body(app_key: &str, master_secret: &Secret, now: i64) -> Vec<u8> {
    let timestamp = now.to_string();
    let mut sign = Sha256::new();
    sign.update(app_key.as_bytes());
    sign.update(timestamp.as_bytes());
    sign.update(master_secret.expose().as_bytes());
    let body = json!({
        "sign": hex::encode(sign.finalize()),
        "timestamp": timestamp,
        "appkey": app_key,
    });
    body.to_string().into_bytes()
}

/// The `request_id` of a batch: the first 32 hex digits of the SHA-256 of its id. Getui takes 10
/// to 32 characters and drops a request whose id it has seen; the batch id is the same on every
/// attempt and after a restart, so a retry never creates a second task.
pub fn request_id(batch_id: &str) -> String {
    let mut id = hex::encode(Sha256::digest(batch_id.as_bytes()));
    id.truncate(32);
    id
}

/// The `push/list/message` body.
pub fn message_body(request_id: &str, ttl: Option<Duration>, notification: Value) -> Vec<u8> {
    let mut body = json!({
        "request_id": request_id,
        "push_message": { "notification": notification },
    });
    if let Some(ttl) = ttl {
        body["settings"] = json!({ "ttl": u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX) });
    }
    body.to_string().into_bytes()
}

/// The `push/list/cid` body.
pub fn cid_body(taskid: &str, cids: &[String]) -> Vec<u8> {
    json!({
        "audience": { "cid": cids },
        "taskid": taskid,
        "is_async": false,
    })
    .to_string()
    .into_bytes()
}

/// A batch's recipients as Getui addresses them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Audience {
    /// Each cid once, in the order of first appearance.
    cids: Vec<String>,
    /// The users of each cid.
    users: HashMap<String, Vec<String>>,
    /// Recipients without a usable cid: failed for good.
    misses: Vec<Miss>,
}

fn audience(recipients: &[Map<String, Value>]) -> Audience {
    let mut out = Audience::default();
    for r in recipients {
        let Some(user) = r.get("user_id").and_then(Value::as_str) else {
            continue;
        };
        let problem = match r.get(CID) {
            Some(Value::String(cid)) if !cid.trim().is_empty() => {
                let users = out.users.entry(cid.clone()).or_default();
                if users.is_empty() {
                    out.cids.push(cid.clone());
                }
                users.push(user.to_string());
                continue;
            }
            Some(Value::String(_)) => "its `cid` is empty",
            None | Some(Value::Null) => "it has no `cid`",
            Some(_) => "its `cid` is not a string",
        };
        out.misses.push(Miss {
            user_id: user.to_string(),
            retry: false,
            reason: format!("{problem}: Getui addresses a device by its client id"),
        });
    }
    out
}

/// What the `push/list/cid` answer says of each cid.
fn statuses(
    status: u16,
    taskid: &str,
    data: &Map<String, Value>,
    cids: &[String],
    users: &HashMap<String, Vec<String>>,
    mut misses: Vec<Miss>,
) -> Report {
    // `data` is `{taskid: {cid: status}}`; an answer under another key is read as well.
    let per_cid = data.get(taskid).or_else(|| match data.len() {
        1 => data.values().next(),
        _ => None,
    });
    let Some(Value::Object(per_cid)) = per_cid else {
        return Report {
            misses,
            ..Report::retry(
                Some(status),
                None,
                "push/list/cid: Getui's answer has no per-cid statuses under the task id; trying again later (the task is not pushed twice to a cid)",
            )
        };
    };
    let mut unanswered = 0usize;
    for cid in cids {
        let (retry, reason) = match per_cid.get(cid) {
            Some(Value::String(s)) if s.starts_with("successed") => continue,
            // Getui documents this status as a message of code 20001.
            Some(Value::String(s)) if s == INVALID_TARGET => (false, format!("20001 {s}")),
            Some(Value::String(s)) => (false, clip(s)),
            Some(other) => (false, clip(&other.to_string())),
            None => {
                unanswered += 1;
                (
                    true,
                    "Getui's answer names no status for this device; tried again".to_string(),
                )
            }
        };
        for user in users.get(cid).into_iter().flatten() {
            misses.push(Miss {
                user_id: user.clone(),
                retry,
                reason: reason.clone(),
            });
        }
    }
    Report {
        status: Some(status),
        error: (unanswered > 0).then(|| {
            format!("push/list/cid: Getui's answer names no status for {unanswered} cid(s); those are tried again")
        }),
        misses,
        rest: Rest::Delivered,
        signal: None,
    }
}

/// A Getui answer.
#[derive(Debug, PartialEq)]
enum Answer {
    /// `code` 0: its `data` (empty when it has none).
    Ok(Map<String, Value>),
    /// Any other `code`.
    Refused {
        /// The code.
        code: i64,
        /// Its `msg`, clipped.
        msg: String,
    },
    /// Not Getui's JSON.
    Unreadable(String),
}

fn read_answer(status: u16, body: &[u8], cut: bool) -> Answer {
    if cut {
        return Answer::Unreadable(format!("longer than {} KiB", MAX_ANSWER / 1024));
    }
    let Ok(Value::Object(mut o)) = serde_json::from_slice::<Value>(body) else {
        return Answer::Unreadable(if body.trim_ascii().is_empty() {
            "empty".into()
        } else {
            "not a JSON object".into()
        });
    };
    let code = match o.get("code") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let Some(code) = code else {
        return Answer::Unreadable("no numeric `code`".into());
    };
    if code == 0 && (200..300).contains(&status) {
        return Answer::Ok(match o.remove("data") {
            Some(Value::Object(data)) => data,
            _ => Map::new(),
        });
    }
    let msg = match o.get("msg") {
        Some(Value::String(s)) => clip(s),
        _ => String::new(),
    };
    let msg = match (code, o.get("data")) {
        // The region's hosts, for the reason.
        (301, Some(data)) => format!("{msg} {}", clip(&data.to_string())),
        _ => msg,
    };
    Answer::Refused { code, msg }
}

/// At most 200 characters of a platform's text, control characters replaced.
fn clip(s: &str) -> String {
    let mut out: String = s
        .trim()
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.trim().chars().count() > 200 {
        out.push('…');
    }
    out
}

/// What to do about an answer that is not a success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reaction {
    /// 10001: fetch a new token and send the request once more.
    Reauth {
        /// The HTTP status.
        status: u16,
        /// Getui's message.
        msg: String,
    },
    /// Send the batch again later, under the retry policy.
    Retry {
        /// The HTTP status, if an answer came.
        status: Option<u16>,
        /// What went wrong.
        error: String,
    },
    /// The message will not be taken as it is: dead-lettered.
    Dead {
        /// The HTTP status.
        status: u16,
        /// What went wrong.
        error: String,
    },
    /// Every device of the request is invalid (20001 `target user is invalid`).
    AllInvalid {
        /// The HTTP status.
        status: u16,
        /// The reason each user fails with.
        reason: String,
    },
    /// The platform rejected the touchpoint's configuration.
    Hold {
        /// The HTTP status.
        status: u16,
        /// The platform's code.
        code: i64,
        /// What it said and what to change.
        reason: String,
    },
    /// A limit: send nothing for `wait`.
    Wait {
        /// The HTTP status.
        status: u16,
        /// The platform's code.
        code: i64,
        /// How long.
        wait: Duration,
        /// What it said and when sending resumes.
        reason: String,
    },
}

impl Reaction {
    /// The report of a batch whose request got this answer.
    fn report(self, users: &HashMap<String, Vec<String>>, mut misses: Vec<Miss>) -> Report {
        let report = match self {
            Reaction::Reauth { status, msg } => Report::retry(
                Some(status),
                None,
                format!("Getui refused the token (10001 {msg}); trying again later"),
            ),
            Reaction::Retry { status, error } => Report::retry(status, None, error),
            Reaction::Dead { status, error } => Report::dead(Some(status), error),
            Reaction::AllInvalid { status, reason } => {
                for user in users.values().flatten() {
                    misses.push(Miss {
                        user_id: user.clone(),
                        retry: false,
                        reason: reason.clone(),
                    });
                }
                Report::delivered(Some(status))
            }
            Reaction::Hold {
                status,
                code,
                reason,
            } => Report::hold(Some(status), code.to_string(), reason),
            Reaction::Wait {
                status,
                code,
                wait,
                reason,
            } => Report::wait(Some(status), wait, code.to_string(), reason),
        };
        Report { misses, ..report }
    }

    /// In words, for `plan --refresh`: the platform's code first.
    fn describe(self) -> String {
        match self {
            Reaction::Reauth { msg, .. } => format!("10001 {msg}"),
            Reaction::Retry { error, .. } | Reaction::Dead { error, .. } => error,
            Reaction::AllInvalid { reason, .. } => reason,
            Reaction::Hold { reason, .. } | Reaction::Wait { reason, .. } => reason,
        }
    }
}

/// What an answer with `code` (not 0) to `step` calls for, at `now` (ms since the epoch). The
/// codes and their HTTP statuses are Getui's (CHANNELS.md 4.5).
pub fn reaction(step: Step, status: u16, code: i64, msg: &str, now: i64) -> Reaction {
    let said = if msg.is_empty() {
        code.to_string()
    } else {
        format!("{code} {msg}")
    };
    let path = step.path();
    let hold = |what_to_do: &str| Reaction::Hold {
        status,
        code,
        reason: format!("Getui refused {path} ({said}): {what_to_do}"),
    };
    let wait = |wait: Duration, until: &str| Reaction::Wait {
        status,
        code,
        wait,
        reason: format!(
            "Getui refused {path} ({said}): a limit is reached; sending resumes {until}"
        ),
    };
    let retry = || Reaction::Retry {
        status: Some(status),
        error: format!("{path}: Getui answered {said} (HTTP {status}); trying again later"),
    };
    match code {
        10001 if step != Step::Auth => Reaction::Reauth {
            status,
            msg: msg.to_string(),
        },
        10003 | 10005 | 30014 | 30015 => wait(to_next_minute(now), "at the next minute"),
        30007..=30010 => wait(
            to_quota_reset(now),
            "at the next midnight in China (00:00 UTC+8), when daily totals reset",
        ),
        2 | 30019 => retry(),
        _ if status >= 500 => retry(),
        1 => Reaction::Dead {
            status,
            error: format!(
                "{path}: Getui could not read the request ({said}); this is a touchctl bug, please report it"
            ),
        },
        301 => {
            hold("this app is served by another Getui host: set `api_base` to the host Getui names")
        }
        20001 if step == Step::Auth => hold(
            "check `app_key` and `master_secret` against the app in the Getui console, then apply the fixed touchpoint or secret",
        ),
        20001 if step == Step::Cid && msg.contains(INVALID_TARGET) => Reaction::AllInvalid {
            status,
            reason: said,
        },
        20001 if step == Step::Cid && msg.contains("taskid") => Reaction::Dead {
            status,
            error: format!(
                "{path}: Getui no longer knows the batch's push task ({said}): its `ttl` ran out before these devices were pushed, so the notification is not sent; replay with a longer `ttl` if it is still wanted"
            ),
        },
        20001 if msg.contains("permission") => {
            hold("the app lacks a permission this push needs: enable it in the Getui console")
        }
        20001..=29999 => Reaction::Dead {
            status,
            error: format!(
                "{path}: Getui refused the message ({said}); change the trigger's `title`, `body` or `payload` (or the touchpoint's defaults) and replay"
            ),
        },
        10001..=10999 => hold(
            "check `app_id`, `app_key` and `master_secret`, and that this server's IP may call the app's API (Getui console), then apply the fixed touchpoint or secret",
        ),
        30000..=39999 => hold(
            "the app's Getui plan does not allow this push: change it in the Getui console, then resume the touchpoint",
        ),
        _ => retry(),
    }
}

/// Checks a trigger against the touchpoint: no template, no template params, a non-empty
/// `title` and `body` (the trigger's or the touchpoint's defaults) within Getui's lengths, and no
/// placeholders (one message goes to every recipient of a batch).
pub fn check(
    spec: &AppPushSpec,
    message: &Message,
    params: &Map<String, Value>,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(t) = &message.template {
        problems.push(format!(
            "`template` (`{}`): app push touchpoints have no templates; give the notification's `title` and `body` in the trigger (or set the touchpoint's defaults)",
            crate::term::escape(t)
        ));
    }
    if !params.is_empty() {
        let names: Vec<String> = params
            .keys()
            .map(|k| format!("`{}`", crate::term::escape(k)))
            .collect();
        problems.push(format!(
            "`template_params` ({}) are not used by app push touchpoints: give the text in `title` and `body`, and data for the app in `payload`",
            names.join(", ")
        ));
    }
    for (field, given, default, max) in [
        ("title", &message.title, &spec.title, MAX_TITLE),
        ("body", &message.body, &spec.body, MAX_BODY),
    ] {
        match given.as_ref().or(default.as_ref()) {
            None => problems.push(format!(
                "`{field}` is required: give it in the trigger, or set the touchpoint's default `{field}`"
            )),
            Some(text) if text.trim().is_empty() => problems.push(format!(
                "`{field}` is empty: Getui shows no notification without a {field}"
            )),
            Some(text) => check_text(&mut problems, field, text, max),
        }
    }
    if let Some(payload) = &message.payload {
        check_text(&mut problems, "payload", payload, MAX_PAYLOAD);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn check_text(problems: &mut Vec<String>, field: &str, text: &str, max: usize) {
    let len = text.chars().count();
    if len > max {
        problems.push(format!(
            "`{field}` is {len} characters long; Getui takes at most {max}"
        ));
    }
    for name in super::template::placeholders(text) {
        problems.push(format!(
            "`{field}` holds the placeholder `{{{{{}}}}}`, but a Getui push sends one message to every recipient of a batch: placeholders cannot be filled per recipient",
            crate::term::escape(name)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Signal;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    const NOW: i64 = 1_608_172_111_917;

    fn spec(extra: &str) -> AppPushSpec {
        toml::from_str(&format!(
            "provider = \"getui\"\napp_id = \"Kq3Lm8Np2Rs5Tv7Wx9Yz1\"\napp_key = \"Ab4Cd6Ef8Gh0Ij2Kl4Mn6\"\nmaster_secret = {{ env = \"UNUSED\" }}\n{extra}\n[dynamic_params]\ncid = \"user.getui_cid\"\n"
        ))
        .unwrap()
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn the_auth_sign_is_the_sha256_of_key_timestamp_and_secret() {
        let body: Value = serde_json::from_slice(&auth_body(
            "Ab4Cd6Ef8Gh0Ij2Kl4Mn6",
            &Secret::new("mastersecret"),
            NOW,
        ))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "sign": "6ebc8a7ca9b72ee8c6a95f1635b294c334f318342ebc9ff0f63bd6e38acd9171",
                "timestamp": "1608172111917",
                "appkey": "Ab4Cd6Ef8Gh0Ij2Kl4Mn6",
            })
        );
    }

    #[test]
    fn a_request_id_is_32_hex_digits_derived_from_the_batch_id() {
        let id = request_id("dsp_0000000000a1b2c3d4e5f6_3");
        assert_eq!(id, "b93cd9fcdfd97acf348e3cecfbaa9930");
        assert_eq!(id, request_id("dsp_0000000000a1b2c3d4e5f6_3"));
        assert_ne!(id, request_id("dsp_0000000000a1b2c3d4e5f6_4"));
    }

    #[test]
    fn endpoints_are_under_v2_and_the_app_id() {
        for base in ["http://127.0.0.1:8641", "http://127.0.0.1:8641/"] {
            assert_eq!(
                endpoint(base, "Kq3", Step::Auth).unwrap(),
                "http://127.0.0.1:8641/v2/Kq3/auth"
            );
        }
        assert_eq!(
            endpoint("https://proxy.example/getui/", "a/b c", Step::Cid).unwrap(),
            "https://proxy.example/getui/v2/a%2Fb%20c/push/list/cid"
        );
        assert_eq!(
            endpoint(DEFAULT_API_BASE, "Kq3", Step::Message).unwrap(),
            "https://restapi.getui.com/v2/Kq3/push/list/message"
        );
        assert!(endpoint("not a url", "Kq3", Step::Auth).is_err());
    }

    #[test]
    fn request_bodies_have_getui_s_shape() {
        let channel = GetuiChannel::new(
            spec("ttl = \"1d\"\ntitle = \"会员专享\""),
            Secret::new("s"),
            Arc::default(),
        )
        .unwrap();
        let plain = Message {
            body: Some("满 100 减 20".into()),
            ..Message::default()
        };
        let body: Value = serde_json::from_slice(&message_body(
            "b93cd9fcdfd97acf348e3cecfbaa9930",
            channel.spec.ttl.map(|t| t.get()),
            channel.notification(&plain),
        ))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "request_id": "b93cd9fcdfd97acf348e3cecfbaa9930",
                "settings": {"ttl": 86_400_000},
                "push_message": {"notification": {
                    "title": "会员专享", "body": "满 100 减 20", "click_type": "none"
                }},
            })
        );
        let with_payload = Message {
            title: Some("Hi".into()),
            body: Some("b".into()),
            payload: Some("{\"page\":\"coupons\"}".into()),
            ..Message::default()
        };
        assert_eq!(
            channel.notification(&with_payload),
            json!({"title": "Hi", "body": "b", "click_type": "payload", "payload": "{\"page\":\"coupons\"}"})
        );
        let body: Value = serde_json::from_slice(&message_body("r", None, json!({}))).unwrap();
        assert!(body.get("settings").is_none(), "no ttl: Getui's default");
        let body: Value =
            serde_json::from_slice(&cid_body("RASL_1", &["c1".into(), "c2".into()])).unwrap();
        assert_eq!(
            body,
            json!({"audience": {"cid": ["c1", "c2"]}, "taskid": "RASL_1", "is_async": false})
        );
    }

    #[test]
    fn recipients_are_addressed_by_cid_each_device_once() {
        let recipients = [
            map(json!({"user_id": "u1", "cid": "c1"})),
            map(json!({"user_id": "u2", "cid": "c2"})),
            map(json!({"user_id": "u3", "cid": "c1"})),
            map(json!({"user_id": "u4"})),
            map(json!({"user_id": "u5", "cid": 7})),
            map(json!({"user_id": "u6", "cid": " "})),
        ];
        let a = audience(&recipients);
        assert_eq!(a.cids, ["c1", "c2"]);
        assert_eq!(a.users["c1"], ["u1", "u3"]);
        let missed: Vec<(&str, bool)> = a
            .misses
            .iter()
            .map(|m| (m.user_id.as_str(), m.retry))
            .collect();
        assert_eq!(missed, [("u4", false), ("u5", false), ("u6", false)]);
        assert!(a.misses[0].reason.starts_with("it has no `cid`"));
        assert!(a.misses[1].reason.starts_with("its `cid` is not a string"));
        assert!(a.misses[2].reason.starts_with("its `cid` is empty"));
    }

    #[test]
    fn per_cid_statuses_fail_only_the_users_of_those_devices() {
        let recipients = [
            map(json!({"user_id": "u1", "cid": "c1"})),
            map(json!({"user_id": "u2", "cid": "c2"})),
            map(json!({"user_id": "u3", "cid": "c3"})),
            map(json!({"user_id": "u4", "cid": "c4"})),
        ];
        let a = audience(&recipients);
        let data = map(json!({"RASL_1": {
            "c1": "successed_online", "c2": "target user is invalid", "c3": "successed_ignore",
            "c5": "successed_offline"
        }}));
        let report = statuses(200, "RASL_1", &data, &a.cids, &a.users, Vec::new());
        assert_eq!(report.rest, Rest::Delivered);
        assert_eq!(
            report.misses,
            [
                Miss {
                    user_id: "u2".into(),
                    retry: false,
                    reason: "20001 target user is invalid".into()
                },
                Miss {
                    user_id: "u4".into(),
                    retry: true,
                    reason: "Getui's answer names no status for this device; tried again".into()
                },
            ]
        );
        assert!(report.error.unwrap().contains("no status for 1 cid(s)"));
        // No statuses at all: the batch is tried again (the task is not pushed twice to a cid).
        let report = statuses(200, "RASL_1", &Map::new(), &a.cids, &a.users, Vec::new());
        assert_eq!(report.rest, Rest::Retry { after: None });
    }

    #[test]
    fn answers_are_read_by_their_code() {
        assert_eq!(
            read_answer(
                200,
                br#"{"code":0,"msg":"","data":{"taskid":"RASL_1"}}"#,
                false
            ),
            Answer::Ok(map(json!({"taskid": "RASL_1"})))
        );
        assert_eq!(
            read_answer(
                401,
                br#"{"code":"10001","msg":"token\u0007 expired"}"#,
                false
            ),
            Answer::Refused {
                code: 10001,
                msg: "token  expired".into()
            }
        );
        assert!(matches!(
            read_answer(200, br#"{"code":301,"msg":"domain","data":{"host_list":[]}}"#, false),
            Answer::Refused { code: 301, msg } if msg.contains("host_list")
        ));
        for (status, body, cut, problem) in [
            (
                502,
                &b"<html>Bad Gateway</html>"[..],
                false,
                "not a JSON object",
            ),
            (200, b"", false, "empty"),
            (200, br#"{"msg":"ok"}"#, false, "no numeric `code`"),
            (200, br#"{"code":0"#, true, "longer than 1024 KiB"),
        ] {
            assert_eq!(
                read_answer(status, body, cut),
                Answer::Unreadable(problem.into())
            );
        }
        let long = "x".repeat(300);
        assert_eq!(clip(&long).chars().count(), 201);
    }

    /// What each code calls for (CHANNELS.md 4.5).
    #[test]
    fn each_code_gets_its_reaction() {
        let kind = |step, status, code, msg: &str| match reaction(step, status, code, msg, NOW) {
            Reaction::Reauth { .. } => "reauth".to_string(),
            Reaction::Retry { .. } => "retry".to_string(),
            Reaction::Dead { .. } => "dead".to_string(),
            Reaction::AllInvalid { .. } => "all-invalid".to_string(),
            Reaction::Hold { code, .. } => format!("hold {code}"),
            Reaction::Wait { wait, .. } => format!("wait {}s", wait.as_secs()),
        };
        // NOW is 02:28:31.917 UTC, 10:28:31.917 in China; waits end a second after the limit
        // resets.
        let minute = "wait 29s";
        let midnight = "wait 48689s";
        for (step, status, code, msg, want) in [
            (Step::Message, 401, 10001, "token expired", "reauth"),
            (Step::Cid, 401, 10001, "", "reauth"),
            (Step::Auth, 401, 10001, "", "hold 10001"),
            (
                Step::Message,
                401,
                10002,
                "appId or ip in blacklist",
                "hold 10002",
            ),
            (Step::Auth, 401, 10003, "", minute),
            (Step::Message, 401, 10004, "", "hold 10004"),
            (Step::Message, 401, 10005, "", minute),
            (Step::Cid, 403, 30014, "", minute),
            (Step::Cid, 403, 30015, "", minute),
            (Step::Message, 403, 30007, "", midnight),
            (Step::Cid, 403, 30008, "", midnight),
            (Step::Cid, 403, 30009, "", midnight),
            (Step::Cid, 403, 30010, "", midnight),
            (Step::Message, 200, 2, "service starting", "retry"),
            (Step::Cid, 403, 30019, "system busy", "retry"),
            (Step::Cid, 503, 30001, "", "retry"),
            (Step::Message, 500, 20001, "", "retry"),
            (Step::Message, 200, 1, "", "dead"),
            (Step::Auth, 200, 301, "", "hold 301"),
            (Step::Auth, 400, 20001, "sign is invalid", "hold 20001"),
            (Step::Auth, 400, 20001, "appkey is invalid", "hold 20001"),
            (
                Step::Cid,
                400,
                20001,
                "target user is invalid",
                "all-invalid",
            ),
            (Step::Message, 400, 20001, "title size over limit", "dead"),
            (
                Step::Message,
                400,
                20001,
                "permission required by payload",
                "hold 20001",
            ),
            (Step::Message, 400, 22002, "invalid task", "dead"),
            (Step::Cid, 400, 20001, "taskid is invalid", "dead"),
            (Step::Message, 403, 30001, "", "hold 30001"),
            (Step::Message, 403, 30018, "", "hold 30018"),
            (Step::Message, 404, 404, "", "retry"),
            (Step::Message, 200, 99, "", "retry"),
        ] {
            assert_eq!(
                kind(step, status, code, msg),
                want,
                "{step:?} {status} {code} {msg}"
            );
        }
        let Reaction::Hold { reason, .. } =
            reaction(Step::Auth, 400, 20001, "sign is invalid", NOW)
        else {
            unreachable!()
        };
        assert_eq!(
            reason,
            "Getui refused auth (20001 sign is invalid): check `app_key` and `master_secret` against the app in the Getui console, then apply the fixed touchpoint or secret"
        );
        let Reaction::AllInvalid { reason, .. } =
            reaction(Step::Cid, 400, 20001, "target user is invalid", NOW)
        else {
            unreachable!()
        };
        assert_eq!(reason, "20001 target user is invalid");
    }

    #[test]
    fn a_trigger_is_checked_and_every_problem_named() {
        let s = spec("title = \"会员专享\"");
        let ok = Message {
            body: Some("满 100 减 20".into()),
            payload: Some("{}".into()),
            ..Message::default()
        };
        assert_eq!(check(&s, &ok, &Map::new()), Ok(()));
        let bad = Message {
            template: Some("order_shipped".into()),
            title: Some("Hi {{name}}".into()),
            body: None,
            payload: Some("p".repeat(3073)),
        };
        assert_eq!(
            check(&s, &bad, &map(json!({"text": "x"}))).unwrap_err(),
            [
                "`template` (`order_shipped`): app push touchpoints have no templates; give the notification's `title` and `body` in the trigger (or set the touchpoint's defaults)",
                "`template_params` (`text`) are not used by app push touchpoints: give the text in `title` and `body`, and data for the app in `payload`",
                "`title` holds the placeholder `{{name}}`, but a Getui push sends one message to every recipient of a batch: placeholders cannot be filled per recipient",
                "`body` is required: give it in the trigger, or set the touchpoint's default `body`",
                "`payload` is 3073 characters long; Getui takes at most 3072",
            ]
        );
        let empty = Message {
            title: Some(" ".into()),
            body: Some("长".repeat(257)),
            ..Message::default()
        };
        assert_eq!(
            check(&s, &empty, &Map::new()).unwrap_err(),
            [
                "`title` is empty: Getui shows no notification without a title",
                "`body` is 257 characters long; Getui takes at most 256",
            ]
        );
    }

    /// A stand-in for Getui: answers from a script per path (then a success), recording every
    /// request.
    #[derive(Default)]
    struct Stub {
        script: Mutex<HashMap<&'static str, VecDeque<(u16, Value)>>>,
        seen: Mutex<Vec<(String, Option<String>, Value)>>,
        tokens: std::sync::atomic::AtomicU32,
    }

    impl Stub {
        fn then(&self, path: &'static str, status: u16, answer: Value) -> &Self {
            self.script
                .lock()
                .unwrap()
                .entry(path)
                .or_default()
                .push_back((status, answer));
            self
        }

        fn seen(&self) -> Vec<(String, Option<String>, Value)> {
            self.seen.lock().unwrap().clone()
        }

        fn answer(&self, path: &str, token: Option<String>, body: Value) -> (u16, Value) {
            let short = ["auth", "push/list/message", "push/list/cid"]
                .into_iter()
                .find(|p| path.ends_with(p))
                .unwrap_or("");
            self.seen
                .lock()
                .unwrap()
                .push((short.to_string(), token, body.clone()));
            if let Some(a) = self
                .script
                .lock()
                .unwrap()
                .get_mut(short)
                .and_then(VecDeque::pop_front)
            {
                return a;
            }
            let ok = |data: Value| (200, json!({"code": 0, "msg": "", "data": data}));
            match short {
                "auth" => {
                    let n = self
                        .tokens
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    ok(json!({
                        "expire_time": (now_ms() + 86_400_000).to_string(),
                        "token": format!("tok{n}"),
                    }))
                }
                "push/list/message" => ok(json!({"taskid": "RASL_1"})),
                _ => {
                    let cids = body["audience"]["cid"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let statuses: Map<String, Value> = cids
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|c| (c.to_string(), json!("successed_online")))
                        .collect();
                    ok(json!({"RASL_1": statuses}))
                }
            }
        }
    }

    async fn serve(stub: Arc<Stub>) -> String {
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let stub = stub.clone();
                async move {
                    let token = headers
                        .get("token")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let (status, answer) = stub.answer(uri.path(), token, body);
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        answer.to_string(),
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    async fn channel(stub: &Arc<Stub>, shared: Arc<Shared>) -> GetuiChannel {
        let url = serve(stub.clone()).await;
        GetuiChannel::new(
            spec(&format!(
                "api_base = \"{url}\"\nallow_insecure = true\ntitle = \"会员专享\"\nbody = \"满 100 减 20\""
            )),
            Secret::new("mastersecret"),
            shared,
        )
        .unwrap()
    }

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    async fn send(channel: &GetuiChannel, batch_id: &str, users: &[(&str, &str)]) -> Report {
        let recipients: Vec<Map<String, Value>> = users
            .iter()
            .map(|(u, c)| map(json!({"user_id": u, "cid": c})))
            .collect();
        let bytes = super::super::recipients(&recipients);
        let client = client();
        let message = Message::default();
        channel
            .send(Outgoing {
                client: &client,
                batch_id,
                touchpoint: "app-push",
                campaign: "spring",
                dispatch_id: "dsp_1",
                index: 0,
                count: 1,
                template_params: "{}",
                message: &message,
                recipients: &bytes,
                recipient_count: users.len() as u32,
            })
            .await
    }

    #[tokio::test]
    async fn a_batch_is_one_task_pushed_to_its_cids_with_the_cached_token() {
        let stub = Arc::new(Stub::default());
        stub.then(
            "push/list/cid",
            200,
            json!({"code": 0, "msg": "", "data": {"RASL_1": {
                "c1": "successed_online", "c2": "target user is invalid"
            }}}),
        );
        let c = channel(&stub, Arc::default()).await;
        let report = send(&c, "dsp_1_0", &[("u1", "c1"), ("u2", "c2")]).await;
        assert_eq!(report.status, Some(200));
        assert_eq!(report.rest, Rest::Delivered);
        assert_eq!(
            report.misses,
            [Miss {
                user_id: "u2".into(),
                retry: false,
                reason: "20001 target user is invalid".into()
            }]
        );
        let report = send(&c, "dsp_1_1", &[("u3", "c3")]).await;
        assert_eq!(report, Report::delivered(Some(200)));
        let seen = stub.seen();
        let paths: Vec<&str> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "auth",
                "push/list/message",
                "push/list/cid",
                "push/list/message",
                "push/list/cid"
            ],
            "one auth for both batches"
        );
        assert_eq!(seen[0].1, None, "auth carries no token");
        assert!(
            seen[1..]
                .iter()
                .all(|(_, t, _)| t.as_deref() == Some("tok0"))
        );
        assert_eq!(seen[1].2["request_id"], json!(request_id("dsp_1_0")));
        assert_eq!(seen[2].2["audience"]["cid"], json!(["c1", "c2"]));
        assert_eq!(seen[2].2["taskid"], json!("RASL_1"));
    }

    #[tokio::test]
    async fn a_refused_token_is_fetched_again_once_and_the_request_sent_once_more() {
        let stub = Arc::new(Stub::default());
        stub.then(
            "push/list/cid",
            401,
            json!({"code": 10001, "msg": "token expired"}),
        );
        let c = channel(&stub, Arc::default()).await;
        let report = send(&c, "dsp_1_0", &[("u1", "c1")]).await;
        assert_eq!(report, Report::delivered(Some(200)));
        let seen = stub.seen();
        let steps: Vec<(&str, Option<&str>)> = seen
            .iter()
            .map(|(p, t, _)| (p.as_str(), t.as_deref()))
            .collect();
        assert_eq!(
            steps,
            [
                ("auth", None),
                ("push/list/message", Some("tok0")),
                ("push/list/cid", Some("tok0")),
                ("auth", None),
                ("push/list/cid", Some("tok1")),
            ]
        );
        // Refused again with the new token: tried again later, not a third time now.
        let stub = Arc::new(Stub::default());
        stub.then(
            "push/list/message",
            401,
            json!({"code": 10001, "msg": "token expired"}),
        )
        .then(
            "push/list/message",
            401,
            json!({"code": 10001, "msg": "token expired"}),
        );
        let c = channel(&stub, Arc::default()).await;
        let report = send(&c, "dsp_1_0", &[("u1", "c1")]).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert!(report.signal.is_none());
        assert!(
            report
                .error
                .unwrap()
                .contains("refused a token it had just issued")
        );
        assert_eq!(stub.seen().len(), 4);
    }

    #[tokio::test]
    async fn a_refused_auth_holds_the_touchpoint_and_limits_make_it_wait() {
        let stub = Arc::new(Stub::default());
        stub.then(
            "auth",
            400,
            json!({"code": 20001, "msg": "sign is invalid"}),
        );
        let c = channel(&stub, Arc::default()).await;
        let report = send(&c, "dsp_1_0", &[("u1", "c1"), ("u2", "")]).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert!(
            matches!(&report.signal, Some(Signal::Hold { code, reason }) if code == "20001" && reason.contains("sign is invalid")),
            "{report:?}"
        );
        assert_eq!(
            report.misses.len(),
            1,
            "the user without a cid fails anyway"
        );
        assert!(!report.error.unwrap().contains("mastersecret"));
        let probe = c.probe(&client()).await;
        assert_eq!(
            probe,
            Ok("Getui auth succeeded for app `Kq3Lm8Np2Rs5Tv7Wx9Yz1`".into())
        );

        let stub = Arc::new(Stub::default());
        stub.then(
            "push/list/cid",
            401,
            json!({"code": 10005, "msg": "rate limit"}),
        );
        let c = channel(&stub, Arc::default()).await;
        let report = send(&c, "dsp_1_0", &[("u1", "c1")]).await;
        let Some(Signal::Wait { wait, code, .. }) = report.signal else {
            panic!("{report:?}")
        };
        assert_eq!(code, "10005");
        assert!(wait <= Duration::from_secs(61) && wait > Duration::from_secs(1));

        let stub = Arc::new(Stub::default());
        stub.then("push/list/message", 503, json!("busy"));
        let c = channel(&stub, Arc::default()).await;
        let report = send(&c, "dsp_1_0", &[("u1", "c1")]).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert_eq!(report.status, Some(503));
        assert!(report.signal.is_none());
        assert!(report.error.unwrap().contains("not Getui's JSON"));
    }

    #[tokio::test]
    async fn touchpoints_with_the_same_credentials_share_a_token() {
        let stub = Arc::new(Stub::default());
        let shared: Arc<Shared> = Arc::default();
        let url = serve(stub.clone()).await;
        let make = |secret: &str| {
            GetuiChannel::new(
                spec(&format!(
                    "api_base = \"{url}\"\nallow_insecure = true\ntitle = \"t\"\nbody = \"b\""
                )),
                Secret::new(secret),
                shared.clone(),
            )
            .unwrap()
        };
        let (a, b, rotated) = (make("s"), make("s"), make("s2"));
        for c in [&a, &b, &rotated] {
            assert_eq!(
                send(c, "dsp_1_0", &[("u1", "c1")]).await.rest,
                Rest::Delivered
            );
        }
        assert_eq!(
            shared.tokens.fetches(),
            2,
            "a rotated secret is a new credential"
        );
    }

    #[tokio::test]
    async fn an_unreachable_platform_is_retried_and_probed_in_words() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let c = GetuiChannel::new(
            spec(&format!(
                "api_base = \"{url}\"\nallow_insecure = true\ntitle = \"t\"\nbody = \"b\""
            )),
            Secret::new("s"),
            Arc::default(),
        )
        .unwrap();
        let report = send(&c, "dsp_1_0", &[("u1", "c1")]).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert!(report.error.unwrap().starts_with("auth: cannot connect"));
        let probe = c.probe(&client()).await.unwrap_err();
        assert!(probe.starts_with("auth: cannot connect"), "{probe}");
    }
}
