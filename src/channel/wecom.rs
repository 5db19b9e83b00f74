//! WeCom (企业微信, CHANNELS.md §3): app messages to members and 客户联系 mass messages to
//! customers.
//!
//! - **Tokens**: `GET /cgi-bin/gettoken?corpid&corpsecret`, cached per corp id and secret in
//!   [`Shared::tokens`] for its `expires_in`. Members are sent with the app `secret`'s token,
//!   customers with the `contact_secret`'s (a members touchpoint does not read its contact
//!   secret). A send answered 40014/42001 (or 40001) drops the token,
//!   fetches a new one and is sent again once; a second refusal is retried later.
//! - **Members** (`audience = "members"`): one `POST /cgi-bin/message/send` per batch, up to 1000
//!   `userid`s joined by `|` in `touser`, with `agentid` and the message type's body (the field
//!   mapping is in [`crate::model::WecomMessage`]'s module). The answer's `invaliduser` and
//!   `unlicenseduser` fail those recipients for good (WeCom writes userids in lower case, so they
//!   are matched without regard to case), the rest are delivered; 81013 fails every recipient.
//!   WeCom's duplicate check is on (30 minutes): a request sent again after a lost answer does not
//!   reach a member twice.
//! - **Customers** (`audience = "customers"`): one `POST /cgi-bin/externalcontact/add_msg_template`
//!   per batch, `chat_type = "single"`, up to 10,000 `external_userid`s, `sender` when set; `text`
//!   becomes `text.content`, `news` one `link` attachment. The answer's `fail_list` fails those
//!   customers; the `msgid` of the mass message goes into the attempt log. (WeCom sends it only
//!   after a member confirms it in the WeCom client.)
//! - **Answers** (errcode in an HTTP 200 body): 40013/40001 at `gettoken`, 60020, 40056, 60011,
//!   48002, 41002/41004 hold the touchpoint (its configuration is wrong); 45009 makes it wait for
//!   the next minute, 45033 for a few seconds; -1, HTTP errors, network errors and answers that are
//!   not WeCom's JSON are retried with backoff; any other code dead-letters the batch with the code
//!   (replayable once the cause is fixed).
//!
//! Placeholders are refused: one request carries one message to many recipients. Neither the
//! secrets nor the tokens appear in any error: requests carry the token in the query, so no URL is
//! ever written out, and the `gettoken` answer (which holds a token) is never quoted.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::answer::{describe, excerpt, parse_retry_after, read_capped};
use super::template::{self, text};
use super::token::{CredentialKey, Token};
use super::{Channel, Message, Miss, Outgoing, Report, Rest, Shared, Unavailable};
use crate::model::{
    MessageTemplate, Secret, SecretPolicy, SecretRef, WecomAudience, WecomMessage, WecomSpec,
};

/// The real service.
pub const DEFAULT_API_BASE: &str = "https://qyapi.weixin.qq.com";

/// `userid`s one `message/send` takes.
pub const MEMBERS_PER_REQUEST: usize = 1000;

/// `external_userid`s one `add_msg_template` takes.
pub const CUSTOMERS_PER_REQUEST: usize = 10_000;

/// How long a request may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The most of an answer read (a `message/send` answer for 1000 invalid users is about 65 KiB).
const MAX_ANSWER: usize = 1024 * 1024;

/// How long WeCom's duplicate check remembers a message (`duplicate_check_interval`, seconds).
const DUPLICATE_CHECK: u32 = 1800;

/// How long to wait after 45033 (too many concurrent calls).
const CONCURRENCY_WAIT: Duration = Duration::from_secs(2);

/// The longest part of an `errmsg` kept.
const MAX_ERRMSG: usize = 200;

/// A credential: the corp id and one of its secrets.
struct Credential {
    /// `secret` or `contact_secret`, for messages.
    field: &'static str,
    key: CredentialKey,
    secret: Secret,
}

/// A live WeCom touchpoint: its settings and resolved secrets.
pub struct WecomChannel {
    spec: WecomSpec,
    base: String,
    app: Credential,
    contact: Option<Credential>,
    shared: Arc<Shared>,
}

impl WecomChannel {
    /// Resolves the touchpoint's secrets (file references relative to `base`).
    pub fn open(
        spec: &WecomSpec,
        base: &Path,
        policy: &SecretPolicy,
        shared: &Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        let resolve = |field: &'static str, r: &SecretRef| {
            r.resolve(base, policy)
                .map_err(|e| Unavailable(format!("cannot read `{field}` {r}: {e}")))
        };
        let app = resolve("secret", &spec.secret)?;
        // Members are sent with the app secret alone: a contact secret they do not use is not read.
        let contact = match (&spec.contact_secret, spec.audience) {
            (Some(r), WecomAudience::Customers) => Some(resolve("contact_secret", r)?),
            _ => None,
        };
        Self::new(spec.clone(), app, contact, shared)
    }

    /// A channel with these secrets already resolved: the app `secret` and, for customers, the
    /// `contact_secret` (ignored for members).
    pub fn new(
        spec: WecomSpec,
        secret: Secret,
        contact_secret: Option<Secret>,
        shared: &Arc<Shared>,
    ) -> Result<Self, Unavailable> {
        if spec.rules().is_none() {
            return Err(Unavailable(format!(
                "`message = \"{}\"` cannot be sent to customers: a 客户联系 mass message takes `text` or `news`",
                spec.message.name()
            )));
        }
        if spec.audience == WecomAudience::Customers && contact_secret.is_none() {
            return Err(Unavailable(
                "`audience = \"customers\"` needs `contact_secret` (the 客户联系 secret)".into(),
            ));
        }
        let credential = |field: &'static str, secret: Secret| Credential {
            field,
            key: CredentialKey::of(&[
                b"wecom",
                spec.corp_id.as_bytes(),
                secret.expose().as_bytes(),
            ]),
            secret,
        };
        let app = credential("secret", secret);
        let contact = contact_secret
            .filter(|_| spec.audience == WecomAudience::Customers)
            .map(|s| credential("contact_secret", s));
        let base = spec
            .api_base
            .as_deref()
            .unwrap_or(DEFAULT_API_BASE)
            .trim_end_matches('/')
            .to_string();
        Ok(Self {
            spec,
            base,
            app,
            contact,
            shared: shared.clone(),
        })
    }

    /// The credential messages are sent with: the contact secret's for customers.
    fn sender(&self) -> &Credential {
        self.contact.as_ref().unwrap_or(&self.app)
    }

    /// `{base}{path}` with `query`; the values are encoded.
    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<url::Url, Failure> {
        let mut url =
            url::Url::parse(&format!("{}{path}", self.base)).map_err(|e| Failure::Hold {
                status: None,
                code: "api_base".into(),
                reason: format!("`api_base` is not a usable URL ({e}): fix it and apply"),
            })?;
        url.query_pairs_mut().extend_pairs(query);
        Ok(url)
    }

    /// The cached token of `cred`, or a new one.
    async fn token(
        &self,
        client: &reqwest::Client,
        cred: &Credential,
    ) -> Result<Arc<Token>, Failure> {
        self.shared
            .tokens
            .get(cred.key, || self.fetch_token(client, cred))
            .await
    }

    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        cred: &Credential,
    ) -> Result<(Secret, Duration), Failure> {
        let url = self.url(
            "/cgi-bin/gettoken",
            &[
                ("corpid", &self.spec.corp_id),
                ("corpsecret", cred.secret.expose()),
            ],
        )?;
        let (status, answer) = call(client.get(url), Quote::Never).await?;
        match classify(answer.errcode, Stage::Token) {
            Class::Ok => {}
            class => return Err(self.failure(class, status, &answer, cred)),
        }
        match (answer.access_token, answer.expires_in) {
            (Some(token), Some(expires_in)) if !token.is_empty() && expires_in > 0 => {
                Ok((Secret::new(token), Duration::from_secs(expires_in)))
            }
            _ => Err(Failure::Retry {
                status: Some(status),
                after: None,
                error: "`gettoken` answered errcode 0 without an `access_token` and a positive `expires_in`: not WeCom's answer".into(),
            }),
        }
    }

    /// Posts `body` to `path` with `cred`'s token; a refused token is replaced and the request
    /// sent again once. `Ok` for errcode 0 and 81013 (every recipient invalid).
    async fn post(
        &self,
        client: &reqwest::Client,
        cred: &Credential,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Answer), Failure> {
        let mut refreshed = false;
        loop {
            let token = self.token(client, cred).await?;
            let url = self.url(path, &[("access_token", token.value.expose())])?;
            let (status, answer) =
                call(client.post(url).body(body.to_vec()), Quote::Excerpt).await?;
            match classify(answer.errcode, Stage::Send) {
                Class::Ok | Class::AllInvalid => return Ok((status, answer)),
                Class::Token if !refreshed => {
                    self.shared.tokens.invalidate(cred.key, &token).await;
                    refreshed = true;
                }
                class => return Err(self.failure(class, status, &answer, cred)),
            }
        }
    }

    /// What a refusal means for the batch and the touchpoint.
    fn failure(&self, class: Class, status: u16, answer: &Answer, cred: &Credential) -> Failure {
        let said = answer.said();
        let code = answer.errcode.to_string();
        let status = Some(status);
        match class {
            Class::Hold => Failure::Hold {
                status,
                reason: format!("{said}: {}", self.hold_hint(answer.errcode, cred)),
                code,
            },
            Class::Wait(wait) => Failure::Wait {
                status,
                reason: format!(
                    "{said}: WeCom's rate limit; this touchpoint sends again in {}",
                    // Whole seconds read better, and the wait is never shorter than said.
                    humantime::format_duration(Duration::from_secs(
                        wait.as_secs()
                            .saturating_add(u64::from(wait.subsec_nanos() > 0))
                    ))
                ),
                wait,
                code,
            },
            Class::Token => Failure::Retry {
                status,
                after: None,
                error: format!(
                    "{said}: WeCom refused a token it had just issued; tried again later"
                ),
            },
            Class::Retry => Failure::Retry {
                status,
                after: None,
                error: format!("{said}: WeCom is busy; tried again later"),
            },
            Class::Ok | Class::AllInvalid | Class::Dead => Failure::Dead {
                status,
                error: format!(
                    "{said}: sending the same again will not succeed; see https://open.work.weixin.qq.com/devtool/query?e={code}, fix the cause, then `touchctl deliveries replay`"
                ),
            },
        }
    }

    /// What to change when WeCom refuses the configuration.
    fn hold_hint(&self, errcode: i64, cred: &Credential) -> String {
        let corp = &self.spec.corp_id;
        let agent = self.spec.agent_id;
        let field = cred.field;
        match errcode {
            40013 => format!(
                "WeCom does not know corp id {corp}: check `corp_id` (admin console → 我的企业), then apply"
            ),
            40001 => format!(
                "WeCom refused the `{field}` of corp {corp}: point `{field}` at the current Secret (admin console → 应用管理, or 客户联系 → API for `contact_secret`), then apply"
            ),
            60020 => "this machine's IP is not among the app's trusted IPs (企业可信IP): add it in the admin console, then resume the touchpoint".into(),
            40056 => format!(
                "agent {agent} is not an app of corp {corp}: check `agent_id`, then apply"
            ),
            60011 => format!(
                "the app has no permission for these recipients or this API (its visible range, or customer contact's 可调用应用): widen it in the admin console, then resume the touchpoint (`{field}`, agent {agent})"
            ),
            48002 => format!(
                "the API is forbidden to the `{field}` credential (e.g. customer contact not enabled for it): enable it in the admin console, then resume the touchpoint"
            ),
            _ => format!(
                "the request lacks a corp id or secret: check `corp_id` and `{field}`, then apply"
            ),
        }
    }

    /// The template a batch names, with its fields' values.
    fn message<'s>(
        &'s self,
        batch: &Outgoing<'_>,
    ) -> Result<(&'s MessageTemplate, Map<String, Value>), String> {
        let Some(id) = batch.message.template.as_deref() else {
            return Err(
                "the trigger names no template; send it again naming one of the touchpoint's templates"
                    .into(),
            );
        };
        let Some(t) = self.spec.templates.iter().find(|t| t.id == id) else {
            return Err(format!(
                "template `{}` is no longer one of the touchpoint's templates: add it back and replay, or send a new trigger",
                crate::term::escape(id)
            ));
        };
        let params = batch.params();
        if let Some(missing) = t
            .fields
            .iter()
            .find(|f| params.get(*f).and_then(text).is_none())
        {
            return Err(format!(
                "template `{}` now has field `{}`, which the trigger did not give: send a new trigger",
                t.id,
                crate::term::escape(missing)
            ));
        }
        Ok((t, params))
    }

    async fn send_batch(&self, batch: Outgoing<'_>) -> Report {
        let (template, params) = match self.message(&batch) {
            Ok(m) => m,
            Err(e) => return Report::dead(None, e),
        };
        let recipients = match batch.parsed_recipients() {
            Ok(r) => r,
            Err(e) => return Report::retry(None, None, e),
        };
        let address = self.spec.audience.address_param();
        let (to, mut misses) = addresses(&recipients, address);
        if to.is_empty() {
            return Report {
                status: None,
                misses,
                rest: Rest::Delivered,
                error: None,
                signal: None,
            };
        }
        let ids: Vec<&str> = to.addresses().collect();
        let customers = self.spec.audience == WecomAudience::Customers;
        let (path, body) = if customers {
            (
                "/cgi-bin/externalcontact/add_msg_template",
                customers_body(&self.spec, template, &params, &ids),
            )
        } else {
            (
                "/cgi-bin/message/send",
                members_body(&self.spec, template, &params, &ids),
            )
        };
        // Writing a JSON value to a Vec cannot fail.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let (status, answer) = match self.post(batch.client, self.sender(), path, &body).await {
            Ok(a) => a,
            Err(f) => return f.report(),
        };
        let mut error = None;
        if answer.errcode != 0 {
            // 81013: every recipient invalid.
            let reason = answer.said();
            for users in to.values() {
                misses.extend(users.iter().map(|u| Miss {
                    user_id: (*u).to_string(),
                    retry: false,
                    reason: reason.clone(),
                }));
            }
        } else if customers {
            misses.extend(failed(
                &to,
                answer.fail_list.iter().flatten(),
                false,
                FAIL_LIST,
            ));
            error = Some(format!(
                "add_msg_template msgid {}: WeCom sends the mass message once a member confirms it in the WeCom client",
                answer.msgid().unwrap_or_else(|| "(none given)".into())
            ));
        } else {
            misses.extend(failed(&to, split(&answer.invaliduser), true, INVALID_USER));
            misses.extend(failed(
                &to,
                split(&answer.unlicenseduser),
                true,
                UNLICENSED_USER,
            ));
        }
        Report {
            status: Some(status),
            misses,
            rest: Rest::Delivered,
            error,
            signal: None,
        }
    }

    async fn check_live(&self, client: &reqwest::Client) -> Result<String, String> {
        let corp = &self.spec.corp_id;
        let agent = self.spec.agent_id;
        let token = self
            .token(client, &self.app)
            .await
            .map_err(|f| format!("gettoken with `secret`: {}", f.describe()))?;
        let url = self
            .url(
                "/cgi-bin/agent/get",
                &[
                    ("access_token", token.value.expose()),
                    ("agentid", &agent.to_string()),
                ],
            )
            .map_err(|f| f.describe())?;
        let (status, answer) = call(client.get(url), Quote::Excerpt)
            .await
            .map_err(|f| format!("agent/get: {}", f.describe()))?;
        match classify(answer.errcode, Stage::Send) {
            Class::Ok => {}
            class => {
                return Err(format!(
                    "agent/get: {}",
                    self.failure(class, status, &answer, &self.app).describe()
                ));
            }
        }
        let name = answer
            .name
            .as_deref()
            .map(|n| {
                let n: String = n.chars().take(64).collect();
                format!(" ({})", crate::term::escape(&n))
            })
            .unwrap_or_default();
        let mut out = format!("corp {corp}: `secret` gets a token; agent {agent}{name} exists");
        if let Some(contact) = &self.contact {
            self.token(client, contact)
                .await
                .map_err(|f| format!("gettoken with `contact_secret`: {}", f.describe()))?;
            out.push_str("; `contact_secret` gets a token");
        }
        Ok(out)
    }
}

impl Channel for WecomChannel {
    fn batch_size(&self) -> usize {
        match self.spec.audience {
            WecomAudience::Members => MEMBERS_PER_REQUEST,
            WecomAudience::Customers => CUSTOMERS_PER_REQUEST,
        }
    }

    fn endpoint(&self) -> &str {
        &self.base
    }

    fn check(&self, message: &Message, params: &Map<String, Value>) -> Result<(), Vec<String>> {
        template::check(
            &self.spec.templates,
            message,
            params,
            &self.spec.dynamic_params,
            true,
        )
        .map(|_| ())
    }

    fn send<'a>(&'a self, batch: Outgoing<'a>) -> BoxFuture<'a, Report> {
        Box::pin(self.send_batch(batch))
    }

    fn probe<'a>(&'a self, client: &'a reqwest::Client) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(self.check_live(client))
    }
}

/// What WeCom answers (every call: `errcode` and `errmsg`, and the call's own fields).
#[derive(Debug, Default, Deserialize)]
struct Answer {
    errcode: i64,
    #[serde(default)]
    errmsg: String,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    invaliduser: Option<String>,
    #[serde(default)]
    unlicenseduser: Option<String>,
    #[serde(default)]
    fail_list: Option<Vec<String>>,
    #[serde(default)]
    msgid: Option<Value>,
    #[serde(default)]
    name: Option<String>,
}

impl Answer {
    /// `errcode errmsg`: the message up to its `, hint: [...], from ip: ...` tail (the code says
    /// what the rest would), cut short.
    fn said(&self) -> String {
        let msg = self.errmsg.trim();
        let msg = msg.split(", hint: [").next().unwrap_or(msg).trim();
        let cut: String = msg.chars().take(MAX_ERRMSG).collect();
        let more = if cut.len() < msg.len() { "…" } else { "" };
        format!("{} {cut}{more}", self.errcode)
            .trim_end()
            .to_string()
    }

    fn msgid(&self) -> Option<String> {
        self.msgid
            .as_ref()
            .and_then(text)
            .map(|m| m.chars().take(128).collect())
    }
}

/// Whether an answer's text may be quoted in an error.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    /// Never: it may hold a token (`gettoken`).
    Never,
    /// Its start.
    Excerpt,
}

/// Sends a request and reads WeCom's JSON answer.
async fn call(request: reqwest::RequestBuilder, quote: Quote) -> Result<(u16, Answer), Failure> {
    let response = request
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| Failure::Retry {
            status: None,
            after: None,
            error: describe(&e, TIMEOUT),
        })?;
    let status = response.status().as_u16();
    let after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    let (body, cut) = read_capped(response, MAX_ANSWER).await;
    let shown = |body: &[u8]| match quote {
        Quote::Excerpt => excerpt(body),
        Quote::Never => String::new(),
    };
    if !(200..300).contains(&status) {
        return Err(Failure::Retry {
            status: Some(status),
            after,
            error: format!("HTTP {status}{}", shown(&body)),
        });
    }
    if cut {
        return Err(Failure::Retry {
            status: Some(status),
            after: None,
            error: format!(
                "the answer is longer than {} KiB: not WeCom's answer",
                MAX_ANSWER / 1024
            ),
        });
    }
    match serde_json::from_slice::<Answer>(&body) {
        Ok(answer) => Ok((status, answer)),
        Err(e) => Err(Failure::Retry {
            status: Some(status),
            after: None,
            error: format!(
                "HTTP {status} with an answer that is not WeCom's JSON ({}){}",
                unreadable(&e),
                shown(&body)
            ),
        }),
    }
}

/// What is wrong with an answer serde could not read.
fn unreadable(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "no numeric `errcode`",
        serde_json::error::Category::Eof => "cut off",
    }
}

/// Where an errcode was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// `gettoken`.
    Token,
    /// A call made with a token.
    Send,
}

/// What an errcode means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Done.
    Ok,
    /// 81013: every recipient is invalid.
    AllInvalid,
    /// The token is no longer valid: fetch another and send again, once.
    Token,
    /// The configuration is wrong: hold the touchpoint.
    Hold,
    /// A rate limit: wait this long.
    Wait(Duration),
    /// Busy: try again with backoff.
    Retry,
    /// This request will not succeed.
    Dead,
}

fn classify(errcode: i64, stage: Stage) -> Class {
    match (errcode, stage) {
        (0, _) => Class::Ok,
        (81013, Stage::Send) => Class::AllInvalid,
        (40014 | 42001, _) | (40001, Stage::Send) => Class::Token,
        (40013 | 40001 | 41002 | 41004, Stage::Token) => Class::Hold,
        (60020 | 40056 | 60011 | 48002, _) => Class::Hold,
        (45009, _) => Class::Wait(until_next_minute(crate::store::now_ms())),
        (45033, _) => Class::Wait(CONCURRENCY_WAIT),
        (-1, _) => Class::Retry,
        _ => Class::Dead,
    }
}

/// From `now_ms` (ms since the epoch) to the start of the next minute (at least a second).
fn until_next_minute(now_ms: i64) -> Duration {
    let into = u64::try_from(now_ms.rem_euclid(60_000)).unwrap_or(0);
    Duration::from_millis(60_000u64.saturating_sub(into).max(1000))
}

/// What became of a batch other than an answer with errcode 0 or 81013.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    Hold {
        status: Option<u16>,
        code: String,
        reason: String,
    },
    Wait {
        status: Option<u16>,
        wait: Duration,
        code: String,
        reason: String,
    },
    Retry {
        status: Option<u16>,
        after: Option<Duration>,
        error: String,
    },
    Dead {
        status: Option<u16>,
        error: String,
    },
}

impl Failure {
    fn report(self) -> Report {
        match self {
            Failure::Hold {
                status,
                code,
                reason,
            } => Report::hold(status, code, reason),
            Failure::Wait {
                status,
                wait,
                code,
                reason,
            } => Report::wait(status, wait, code, reason),
            Failure::Retry {
                status,
                after,
                error,
            } => Report::retry(status, after, error),
            Failure::Dead { status, error } => Report::dead(status, error),
        }
    }

    /// In words, for `plan --refresh`.
    fn describe(self) -> String {
        match self {
            Failure::Hold { reason, .. } | Failure::Wait { reason, .. } => reason,
            Failure::Retry { error, .. } | Failure::Dead { error, .. } => error,
        }
    }
}

/// Each recipient's address (by the lower-cased address for userids, which WeCom compares without
/// regard to case), in the batch's order, and the recipients that have no usable one.
fn addresses<'r>(recipients: &'r [Map<String, Value>], param: &str) -> (Addressed<'r>, Vec<Miss>) {
    let mut to = Addressed::default();
    let mut misses = Vec::new();
    let fold = param == "userid";
    for r in recipients {
        let Some(user) = r.get("user_id").and_then(Value::as_str) else {
            continue;
        };
        match r.get(param).and_then(Value::as_str).map(str::trim) {
            Some(a) if !a.is_empty() && !a.contains('|') => {
                let key = if fold {
                    a.to_lowercase()
                } else {
                    a.to_string()
                };
                to.push(key, a, user);
            }
            _ => misses.push(Miss {
                user_id: user.to_string(),
                retry: false,
                reason: format!("`{param}` is empty or not a WeCom {param}"),
            }),
        }
    }
    (to, misses)
}

/// The batch's addresses in the order first seen, each with the users it stands for (two users
/// may share one).
#[derive(Default)]
struct Addressed<'r> {
    /// (key, the address as the first user with it spelt it).
    order: Vec<(String, &'r str)>,
    users: HashMap<String, Vec<&'r str>>,
}

impl<'r> Addressed<'r> {
    fn push(&mut self, key: String, address: &'r str, user: &'r str) {
        match self.users.get_mut(&key) {
            Some(users) => users.push(user),
            None => {
                self.order.push((key.clone(), address));
                self.users.insert(key, vec![user]);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The addresses to send to, as spelt.
    fn addresses(&self) -> impl Iterator<Item = &'r str> {
        self.order.iter().map(|(_, a)| *a)
    }

    fn values(&self) -> impl Iterator<Item = &Vec<&'r str>> {
        self.order.iter().filter_map(|(k, _)| self.users.get(k))
    }

    fn get(&self, address: &str) -> Option<&Vec<&'r str>> {
        self.users.get(address)
    }
}

const INVALID_USER: &str = "invaliduser: WeCom cannot reach this userid through the app (not a member, or outside the app's visible range)";
const UNLICENSED_USER: &str =
    "unlicenseduser: the member has no basic API licence (基础接口许可) for this app";
const FAIL_LIST: &str = "fail_list: WeCom left this customer out of the mass message (not a customer of the sender, or over the customer's monthly limit)";

/// The recipients an answer names, failed for good with `reason`.
fn failed(
    to: &Addressed<'_>,
    named: impl IntoIterator<Item = impl AsRef<str>>,
    fold: bool,
    reason: &str,
) -> Vec<Miss> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for id in named {
        let id = id.as_ref().trim();
        let key = if fold {
            id.to_lowercase()
        } else {
            id.to_string()
        };
        if !seen.insert(key.clone()) {
            continue;
        }
        for user in to.get(&key).into_iter().flatten() {
            out.push(Miss {
                user_id: (*user).to_string(),
                retry: false,
                reason: reason.to_string(),
            });
        }
    }
    out
}

/// The ids of a `|`-joined list.
fn split(list: &Option<String>) -> impl Iterator<Item = &str> {
    list.as_deref()
        .unwrap_or_default()
        .split('|')
        .filter(|s| !s.trim().is_empty())
}

/// A field's value as text (the trigger was checked to give every field).
fn field(params: &Map<String, Value>, name: &str) -> String {
    params.get(name).and_then(text).unwrap_or_default()
}

/// An optional field, when the template declares it.
fn optional(t: &MessageTemplate, params: &Map<String, Value>, name: &str) -> Option<String> {
    t.fields
        .iter()
        .any(|f| f == name)
        .then(|| field(params, name))
}

/// The `message/send` body for `userids`.
fn members_body(
    spec: &WecomSpec,
    t: &MessageTemplate,
    params: &Map<String, Value>,
    userids: &[&str],
) -> Value {
    let mut body = json!({
        "touser": userids.join("|"),
        "msgtype": spec.message.name(),
        "agentid": spec.agent_id,
    });
    let content = match spec.message {
        WecomMessage::Text => json!({ "content": field(params, "content") }),
        WecomMessage::Textcard => {
            let mut card = json!({
                "title": field(params, "title"),
                "description": field(params, "description"),
                "url": t.url.clone().unwrap_or_default(),
            });
            if let Some(b) = optional(t, params, "btntxt") {
                card["btntxt"] = b.into();
            }
            card
        }
        WecomMessage::News => {
            let mut article = json!({ "title": field(params, "title") });
            for name in ["description", "picurl"] {
                if let Some(v) = optional(t, params, name) {
                    article[name] = v.into();
                }
            }
            if let Some(url) = &t.url {
                article["url"] = url.clone().into();
            }
            if let Some(mp) = &t.mini_program {
                article["appid"] = mp.app_id.clone().into();
                article["pagepath"] = mp.page.clone().into();
            }
            json!({ "articles": [article] })
        }
        WecomMessage::MiniprogramNotice => {
            let (appid, page) = t
                .mini_program
                .as_ref()
                .map(|mp| (mp.app_id.clone(), mp.page.clone()))
                .unwrap_or_default();
            let mut notice = json!({
                "appid": appid,
                "page": page,
                "title": field(params, "title"),
                "emphasis_first_item": false,
            });
            if let Some(d) = optional(t, params, "description") {
                notice["description"] = d.into();
            }
            let items: Vec<Value> = t
                .fields
                .iter()
                .filter(|f| !["title", "description"].contains(&f.as_str()))
                .map(|f| json!({ "key": f, "value": field(params, f) }))
                .collect();
            notice["content_item"] = items.into();
            notice
        }
    };
    body[spec.message.name()] = content;
    body["safe"] = 0.into();
    body["enable_duplicate_check"] = 1.into();
    body["duplicate_check_interval"] = DUPLICATE_CHECK.into();
    body
}

/// The `add_msg_template` body for `external_userids` (`text` or `news`, the only types customers
/// take).
fn customers_body(
    spec: &WecomSpec,
    t: &MessageTemplate,
    params: &Map<String, Value>,
    external_userids: &[&str],
) -> Value {
    let mut body = json!({
        "chat_type": "single",
        "external_userid": external_userids,
    });
    if let Some(sender) = &spec.sender {
        body["sender"] = sender.clone().into();
    }
    match spec.message {
        WecomMessage::News => {
            let mut link = json!({
                "title": field(params, "title"),
                "url": t.url.clone().unwrap_or_default(),
            });
            if let Some(d) = optional(t, params, "description") {
                link["desc"] = d.into();
            }
            if let Some(p) = optional(t, params, "picurl") {
                link["picurl"] = p.into();
            }
            body["attachments"] = json!([{ "msgtype": "link", "link": link }]);
        }
        _ => body["text"] = json!({ "content": field(params, "content") }),
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Signal;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use axum::body::Bytes;
    use axum::http::{StatusCode, Uri};
    use axum::response::IntoResponse;

    const SECRET: &str = "app-secret-value";
    const CONTACT: &str = "contact-secret-value";

    fn spec(extra: &str) -> WecomSpec {
        toml::from_str(&format!(
            r#"
corp_id = "ww4f1e2d3c4b5a6978"
agent_id = 1000005
secret = {{ env = "UNUSED" }}
api_base = "http://127.0.0.1:9/"
allow_insecure = true
{extra}
[dynamic_params]
userid = "user.wecom_userid"
external_userid = "user.external_userid"
"#
        ))
        .unwrap()
    }

    const TEXT: &str = r#"
[[templates]]
id = "hello"
template_id = "hello"
fields = ["content"]
"#;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn channel(spec: WecomSpec) -> WecomChannel {
        let contact = spec.contact_secret.as_ref().map(|_| Secret::new(CONTACT));
        WecomChannel::new(spec, Secret::new(SECRET), contact, &Arc::default()).unwrap()
    }

    #[test]
    fn errcodes_map_to_outcomes() {
        use Class::*;
        for (code, stage, class) in [
            (0, Stage::Token, Ok),
            (0, Stage::Send, Ok),
            (81013, Stage::Send, AllInvalid),
            (40014, Stage::Send, Token),
            (42001, Stage::Send, Token),
            (40001, Stage::Send, Token),
            (40001, Stage::Token, Hold),
            (40013, Stage::Token, Hold),
            (41002, Stage::Token, Hold),
            (41004, Stage::Token, Hold),
            (60020, Stage::Token, Hold),
            (60020, Stage::Send, Hold),
            (40056, Stage::Send, Hold),
            (60011, Stage::Send, Hold),
            (48002, Stage::Send, Hold),
            (48002, Stage::Token, Hold),
            (45033, Stage::Send, Wait(CONCURRENCY_WAIT)),
            (-1, Stage::Token, Retry),
            (-1, Stage::Send, Retry),
            (44004, Stage::Send, Dead),
            (40058, Stage::Send, Dead),
            (81013, Stage::Token, Dead),
        ] {
            assert_eq!(classify(code, stage), class, "{code} at {stage:?}");
        }
        let Wait(wait) = classify(45009, Stage::Send) else {
            panic!("45009 waits");
        };
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
    }

    #[test]
    fn a_minute_limit_waits_for_the_next_minute() {
        assert_eq!(until_next_minute(0), Duration::from_secs(60));
        assert_eq!(
            until_next_minute(60_000 * 5 + 15_500),
            Duration::from_millis(44_500)
        );
        // Never less than a second, so a limit hit at :59.9 does not spin.
        assert_eq!(until_next_minute(59_900), Duration::from_secs(1));
        assert_eq!(until_next_minute(-1), Duration::from_secs(1));
    }

    #[test]
    fn members_bodies_follow_the_message_type() {
        let params = map(json!({
            "content": "新品到店", "title": "到店提醒", "description": "本周新品",
            "btntxt": "查看", "picurl": "https://img.example.com/a.png", "门店": "静安店", "取货码": 1234
        }));
        let text = spec(TEXT);
        assert_eq!(
            members_body(&text, &text.templates[0], &params, &["ZhangSan", "lisi"]),
            json!({
                "touser": "ZhangSan|lisi", "msgtype": "text", "agentid": 1000005,
                "text": {"content": "新品到店"},
                "safe": 0, "enable_duplicate_check": 1, "duplicate_check_interval": 1800
            })
        );
        let card = spec(
            r#"message = "textcard"
[[templates]]
id = "card"
template_id = "card"
fields = ["title", "description", "btntxt"]
url = "https://m.example.com/new"
"#,
        );
        assert_eq!(
            members_body(&card, &card.templates[0], &params, &["a"])["textcard"],
            json!({"title": "到店提醒", "description": "本周新品", "url": "https://m.example.com/new", "btntxt": "查看"})
        );
        let news = spec(
            r#"message = "news"
linked_mini_programs = ["wx1d2e3f4a5b6c7d8e"]
[[templates]]
id = "news"
template_id = "news"
fields = ["title", "picurl"]
url = "https://m.example.com/new"
mini_program = { app_id = "wx1d2e3f4a5b6c7d8e", page = "pages/new" }
"#,
        );
        assert_eq!(
            members_body(&news, &news.templates[0], &params, &["a"])["news"],
            json!({"articles": [{
                "title": "到店提醒", "picurl": "https://img.example.com/a.png", "url": "https://m.example.com/new",
                "appid": "wx1d2e3f4a5b6c7d8e", "pagepath": "pages/new"
            }]})
        );
        let notice = spec(
            r#"message = "miniprogram_notice"
linked_mini_programs = ["wx1d2e3f4a5b6c7d8e"]
[[templates]]
id = "pickup"
template_id = "pickup"
fields = ["title", "门店", "description", "取货码"]
mini_program = { app_id = "wx1d2e3f4a5b6c7d8e", page = "pages/pickup" }
"#,
        );
        let body = members_body(&notice, &notice.templates[0], &params, &["a"]);
        assert_eq!(body["msgtype"], "miniprogram_notice");
        assert_eq!(
            body["miniprogram_notice"],
            json!({
                "appid": "wx1d2e3f4a5b6c7d8e", "page": "pages/pickup", "title": "到店提醒",
                "description": "本周新品", "emphasis_first_item": false,
                "content_item": [{"key": "门店", "value": "静安店"}, {"key": "取货码", "value": "1234"}]
            })
        );
    }

    #[test]
    fn customers_bodies_are_text_or_one_link() {
        let params = map(json!({"content": "会员日", "title": "会员日", "description": "全场8折"}));
        let text = spec(&format!(
            "audience = \"customers\"\nsender = \"zhangsan\"\ncontact_secret = {{ env = \"UNUSED\" }}\n{TEXT}"
        ));
        assert_eq!(
            customers_body(&text, &text.templates[0], &params, &["wmA", "wmB"]),
            json!({"chat_type": "single", "external_userid": ["wmA", "wmB"], "sender": "zhangsan", "text": {"content": "会员日"}})
        );
        let news = spec(
            r#"audience = "customers"
contact_secret = { env = "UNUSED" }
message = "news"
[[templates]]
id = "day"
template_id = "day"
fields = ["title", "description"]
url = "https://m.example.com/day"
"#,
        );
        assert_eq!(
            customers_body(&news, &news.templates[0], &params, &["wmA"]),
            json!({"chat_type": "single", "external_userid": ["wmA"], "attachments": [
                {"msgtype": "link", "link": {"title": "会员日", "desc": "全场8折", "url": "https://m.example.com/day"}}
            ]})
        );
    }

    #[test]
    fn a_channel_refuses_what_it_cannot_send() {
        let card_to_customers = spec(
            "audience = \"customers\"\ncontact_secret = { env = \"UNUSED\" }\nmessage = \"textcard\"\n",
        );
        let e = WecomChannel::new(
            card_to_customers,
            Secret::new(SECRET),
            Some(Secret::new(CONTACT)),
            &Arc::default(),
        )
        .err()
        .unwrap();
        assert!(e.0.contains("takes `text` or `news`"), "{e}");
        let customers = spec("audience = \"customers\"\n");
        let e = WecomChannel::new(customers, Secret::new(SECRET), None, &Arc::default())
            .err()
            .unwrap();
        assert!(e.0.contains("needs `contact_secret`"), "{e}");
        // Members are sent with the app secret, whatever else the file names.
        let members = WecomChannel::new(
            spec("contact_secret = { env = \"UNUSED\" }\n"),
            Secret::new(SECRET),
            Some(Secret::new(CONTACT)),
            &Arc::default(),
        )
        .unwrap();
        assert!(members.contact.is_none());
        assert_eq!(members.sender().field, "secret");
    }

    #[test]
    fn triggers_name_a_template_and_take_no_placeholders() {
        let ch = channel(spec(TEXT));
        let msg = Message {
            template: Some("hello".into()),
            ..Message::default()
        };
        assert_eq!(ch.check(&msg, &map(json!({"content": "hi"}))), Ok(()));
        let problems = ch
            .check(&msg, &map(json!({"content": "hi {{userid}}"})))
            .unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("one message to many recipients"),
            "{problems:?}"
        );
        assert!(ch.check(&Message::default(), &Map::new()).is_err());
    }

    #[test]
    fn addresses_are_matched_without_regard_to_case() {
        let recipients = vec![
            map(json!({"user_id": "u1", "userid": "ZhangSan"})),
            map(json!({"user_id": "u2", "userid": "lisi"})),
            map(json!({"user_id": "u3", "userid": "zhangsan"})),
            map(json!({"user_id": "u4", "userid": "a|b"})),
            map(json!({"user_id": "u5", "userid": " "})),
            map(json!({"user_id": "u6", "userid": 7})),
        ];
        let (to, misses) = addresses(&recipients, "userid");
        assert_eq!(to.addresses().collect::<Vec<_>>(), ["ZhangSan", "lisi"]);
        let bad: Vec<&str> = misses.iter().map(|m| m.user_id.as_str()).collect();
        assert_eq!(bad, ["u4", "u5", "u6"]);
        assert!(misses.iter().all(|m| !m.retry));
        let invalid = Some("zhangsan|nobody|ZHANGSAN".to_string());
        let failed_ids: Vec<String> = failed(&to, split(&invalid), true, INVALID_USER)
            .into_iter()
            .map(|m| m.user_id)
            .collect();
        assert_eq!(failed_ids, ["u1", "u3"]);
        // External userids are compared as they are.
        let customers = vec![map(json!({"user_id": "c1", "external_userid": "wmAbC"}))];
        let (to, _) = addresses(&customers, "external_userid");
        assert!(failed(&to, ["wmabc"], false, FAIL_LIST).is_empty());
        assert_eq!(failed(&to, ["wmAbC"], false, FAIL_LIST).len(), 1);
    }

    /// A scripted WeCom: each path answers its queued bodies in turn (then its default), and every
    /// request is recorded.
    #[derive(Default)]
    struct Stub {
        answers: Mutex<HashMap<String, VecDeque<(u16, String)>>>,
        seen: Mutex<Vec<(String, String, Value)>>,
        tokens: std::sync::atomic::AtomicU32,
    }

    impl Stub {
        fn then(&self, path: &str, status: u16, body: Value) -> &Self {
            self.then_raw(path, status, &body.to_string())
        }

        fn then_raw(&self, path: &str, status: u16, body: &str) -> &Self {
            self.answers
                .lock()
                .unwrap()
                .entry(path.to_string())
                .or_default()
                .push_back((status, body.to_string()));
            self
        }

        fn seen(&self, path: &str) -> Vec<(String, Value)> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _, _)| p == path)
                .map(|(_, q, b)| (q.clone(), b.clone()))
                .collect()
        }

        fn answer(&self, uri: &Uri, body: &[u8]) -> (u16, String) {
            let path = uri.path().to_string();
            let query = uri.query().unwrap_or_default().to_string();
            let body = serde_json::from_slice(body).unwrap_or(Value::Null);
            self.seen
                .lock()
                .unwrap()
                .push((path.clone(), query.clone(), body));
            if let Some(next) = self
                .answers
                .lock()
                .unwrap()
                .get_mut(&path)
                .and_then(VecDeque::pop_front)
            {
                return next;
            }
            if path == "/cgi-bin/gettoken" {
                let n = self
                    .tokens
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let who = if query.contains(CONTACT) {
                    "contact"
                } else {
                    "app"
                };
                return (
                    200,
                    json!({"errcode": 0, "errmsg": "ok", "access_token": format!("{who}-token-{n}"), "expires_in": 7200})
                        .to_string(),
                );
            }
            (
                200,
                json!({"errcode": 0, "errmsg": "ok", "msgid": "m1"}).to_string(),
            )
        }
    }

    async fn serve(stub: Arc<Stub>) -> String {
        let app = axum::Router::new().fallback(move |uri: Uri, body: Bytes| {
            let stub = stub.clone();
            async move {
                let (status, body) = stub.answer(&uri, &body);
                (StatusCode::from_u16(status).unwrap(), body).into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    async fn live(stub: &Arc<Stub>, extra: &str) -> WecomChannel {
        let base = serve(stub.clone()).await;
        let mut s = spec(extra);
        s.api_base = Some(base);
        channel(s)
    }

    async fn send(ch: &WecomChannel, params: Value, users: &[(&str, &str)]) -> Report {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let address = ch.spec.audience.address_param();
        let objects: Vec<Map<String, Value>> = users
            .iter()
            .map(|(u, a)| map(json!({"user_id": u, address: a})))
            .collect();
        let recipients = super::super::recipients(&objects);
        let params = params.to_string();
        let message = Message {
            template: ch.spec.templates.first().map(|t| t.id.clone()),
            ..Message::default()
        };
        ch.send(Outgoing {
            client: &client,
            batch_id: "b1",
            touchpoint: "wecom-stores",
            campaign: "c",
            dispatch_id: "d1",
            index: 0,
            count: 1,
            template_params: &params,
            message: &message,
            recipients: &recipients,
            recipient_count: users.len() as u32,
        })
        .await
    }

    fn no_secret(report: &Report) {
        let text = format!("{report:?}");
        for s in [SECRET, CONTACT, "app-token", "contact-token"] {
            assert!(!text.contains(s), "{s} in {text}");
        }
    }

    const SEND: &str = "/cgi-bin/message/send";
    const MASS: &str = "/cgi-bin/externalcontact/add_msg_template";
    const TOKEN: &str = "/cgi-bin/gettoken";

    #[tokio::test]
    async fn a_members_batch_is_one_request_and_invalid_users_fail_for_good() {
        let stub = Arc::new(Stub::default());
        stub.then(
            SEND,
            200,
            json!({"errcode": 0, "errmsg": "ok", "invaliduser": "bob", "unlicenseduser": "carol", "msgid": "m1"}),
        );
        let ch = live(&stub, TEXT).await;
        let report = send(
            &ch,
            json!({"content": "新品到店"}),
            &[("u1", "alice"), ("u2", "Bob"), ("u3", "carol")],
        )
        .await;
        assert_eq!(report.rest, Rest::Delivered);
        assert_eq!(report.signal, None);
        assert_eq!(report.error, None);
        let misses: Vec<(&str, bool, &str)> = report
            .misses
            .iter()
            .map(|m| {
                (
                    m.user_id.as_str(),
                    m.retry,
                    m.reason.split(':').next().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            misses,
            [
                ("u2", false, "invaliduser"),
                ("u3", false, "unlicenseduser")
            ]
        );
        let tokens = stub.seen(TOKEN);
        assert_eq!(tokens.len(), 1);
        assert_eq!(
            tokens[0].0,
            format!("corpid=ww4f1e2d3c4b5a6978&corpsecret={SECRET}")
        );
        let sent = stub.seen(SEND);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, "access_token=app-token-0");
        assert_eq!(sent[0].1["touser"], "alice|Bob|carol");
        assert_eq!(sent[0].1["text"]["content"], "新品到店");
        no_secret(&report);
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_and_the_send_repeated_once() {
        let stub = Arc::new(Stub::default());
        stub.then(
            SEND,
            200,
            json!({"errcode": 42001, "errmsg": "access_token expired"}),
        );
        let ch = live(&stub, TEXT).await;
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        assert_eq!(report, Report::delivered(Some(200)));
        let sent = stub.seen(SEND);
        assert_eq!(
            sent.iter().map(|(q, _)| q.as_str()).collect::<Vec<_>>(),
            ["access_token=app-token-0", "access_token=app-token-1"]
        );
        assert_eq!(ch.shared.tokens.fetches(), 2);
        // Refused again right after a new token: retried later, not held.
        stub.then(
            SEND,
            200,
            json!({"errcode": 40014, "errmsg": "invalid access_token"}),
        )
        .then(
            SEND,
            200,
            json!({"errcode": 40001, "errmsg": "invalid credential"}),
        );
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert_eq!(report.signal, None);
        assert!(
            report
                .error
                .as_deref()
                .unwrap()
                .starts_with("40001 invalid credential"),
            "{report:?}"
        );
        no_secret(&report);
    }

    #[tokio::test]
    async fn a_refused_secret_holds_the_touchpoint_without_showing_it() {
        let stub = Arc::new(Stub::default());
        stub.then(
            TOKEN,
            200,
            json!({"errcode": 40001, "errmsg": "invalid credential, hint: [1614140502_160_x], from ip: 127.0.0.1"}),
        );
        let ch = live(&stub, TEXT).await;
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        let Some(Signal::Hold { code, reason }) = &report.signal else {
            panic!("held: {report:?}");
        };
        assert_eq!(code, "40001");
        assert!(
            reason.starts_with("40001 invalid credential: WeCom refused the `secret`"),
            "{reason}"
        );
        assert!(
            reason.contains("point `secret` at the current Secret"),
            "{reason}"
        );
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert!(stub.seen(SEND).is_empty());
        no_secret(&report);
        for (code, hint) in [(40013, "check `corp_id`"), (60020, "trusted IPs")] {
            stub.then(TOKEN, 200, json!({"errcode": code, "errmsg": "no"}));
            let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
            assert!(
                report
                    .signal
                    .as_ref()
                    .is_some_and(|s| s.code() == code.to_string() && s.reason().contains(hint)),
                "{report:?}"
            );
        }
        for (code, hint) in [
            (40056, "check `agent_id`"),
            (60011, "no permission"),
            (48002, "forbidden"),
        ] {
            stub.then(SEND, 200, json!({"errcode": code, "errmsg": "no"}));
            let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
            let Some(Signal::Hold { reason, .. }) = &report.signal else {
                panic!("{code} holds: {report:?}");
            };
            assert!(reason.contains(hint), "{reason}");
        }
    }

    #[tokio::test]
    async fn limits_wait_and_busy_or_broken_answers_are_retried() {
        let stub = Arc::new(Stub::default());
        let ch = live(&stub, TEXT).await;
        stub.then(
            SEND,
            200,
            json!({"errcode": 45009, "errmsg": "api freq out of limit"}),
        );
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        let Some(Signal::Wait { wait, code, .. }) = &report.signal else {
            panic!("waits: {report:?}");
        };
        assert_eq!(code, "45009");
        assert!(*wait <= Duration::from_secs(60));
        stub.then(
            SEND,
            200,
            json!({"errcode": 45033, "errmsg": "api concurrent out of limit"}),
        );
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        assert!(
            matches!(report.signal, Some(Signal::Wait { wait, .. }) if wait == CONCURRENCY_WAIT)
        );
        for (status, body, error) in [
            (
                200,
                r#"{"errcode":-1,"errmsg":"system busy"}"#,
                "-1 system busy: WeCom is busy",
            ),
            (
                200,
                "<html>gateway</html>",
                "not WeCom's JSON (not JSON): <html>",
            ),
            (200, r#"{"errmsg":"ok"}"#, "(no numeric `errcode`)"),
            (502, "bad gateway", "HTTP 502: bad gateway"),
        ] {
            stub.then_raw(SEND, status, body);
            let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
            assert_eq!(report.rest, Rest::Retry { after: None }, "{body}");
            assert_eq!(report.signal, None);
            assert!(
                report.error.as_deref().unwrap().contains(error),
                "{report:?}"
            );
        }
        stub.then(
            SEND,
            200,
            json!({"errcode": 40058, "errmsg": "invalid parameter"}),
        );
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        assert_eq!(report.rest, Rest::Dead);
        assert!(
            report
                .error
                .as_deref()
                .unwrap()
                .starts_with("40058 invalid parameter")
        );
        // A token answer that cannot be read is never quoted: it may hold a token.
        stub.then_raw(TOKEN, 200, r#"{"errcode":0,"access_token":"leaked-token"#);
        let ch = live(&stub, TEXT).await;
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        assert_eq!(report.rest, Rest::Retry { after: None });
        assert!(!format!("{report:?}").contains("leaked"), "{report:?}");
    }

    #[tokio::test]
    async fn every_recipient_invalid_fails_them_all() {
        let stub = Arc::new(Stub::default());
        stub.then(
            SEND,
            200,
            json!({"errcode": 81013, "errmsg": "user & party & tag all invalid", "invaliduser": "a|b"}),
        );
        let ch = live(&stub, TEXT).await;
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a"), ("u2", "b")]).await;
        assert_eq!(report.misses.len(), 2);
        assert!(
            report
                .misses
                .iter()
                .all(|m| !m.retry && m.reason == "81013 user & party & tag all invalid")
        );
    }

    #[tokio::test]
    async fn customers_are_sent_with_the_contact_secret_and_the_msgid_is_noted() {
        let stub = Arc::new(Stub::default());
        stub.then(
            MASS,
            200,
            json!({"errcode": 0, "errmsg": "ok", "fail_list": ["wmB"], "msgid": "msgGCAAAXtWyuja"}),
        );
        let ch = live(
            &stub,
            &format!("audience = \"customers\"\ncontact_secret = {{ env = \"UNUSED\" }}\n{TEXT}"),
        )
        .await;
        assert_eq!(ch.batch_size(), 10_000);
        let report = send(
            &ch,
            json!({"content": "会员日"}),
            &[("c1", "wmA"), ("c2", "wmB")],
        )
        .await;
        assert_eq!(report.rest, Rest::Delivered);
        assert_eq!(report.misses.len(), 1);
        assert_eq!(report.misses[0].user_id, "c2");
        assert!(report.misses[0].reason.starts_with("fail_list"));
        assert!(
            report
                .error
                .as_deref()
                .unwrap()
                .starts_with("add_msg_template msgid msgGCAAAXtWyuja"),
            "{report:?}"
        );
        let tokens = stub.seen(TOKEN);
        assert_eq!(
            tokens[0].0,
            format!("corpid=ww4f1e2d3c4b5a6978&corpsecret={CONTACT}")
        );
        let sent = stub.seen(MASS);
        assert_eq!(sent[0].0, "access_token=contact-token-0");
        assert_eq!(
            sent[0].1,
            json!({"chat_type": "single", "external_userid": ["wmA", "wmB"], "text": {"content": "会员日"}})
        );
        no_secret(&report);
    }

    #[tokio::test]
    async fn a_batch_whose_template_is_gone_is_dead_lettered() {
        let stub = Arc::new(Stub::default());
        let mut ch = live(&stub, TEXT).await;
        ch.spec.templates[0].fields.push("extra".into());
        let report = send(&ch, json!({"content": "hi"}), &[("u1", "a")]).await;
        assert_eq!(report.rest, Rest::Dead);
        assert!(report.error.unwrap().contains("now has field `extra`"));
        ch.spec.templates[0].id = "renamed".into();
        let client = reqwest::Client::new();
        let message = Message {
            template: Some("hello".into()),
            ..Message::default()
        };
        let report = ch
            .send(Outgoing {
                client: &client,
                batch_id: "b1",
                touchpoint: "t",
                campaign: "c",
                dispatch_id: "d",
                index: 0,
                count: 1,
                template_params: "{}",
                message: &message,
                recipients: br#"{"user_id":"u1","userid":"a"}"#,
                recipient_count: 1,
            })
            .await;
        assert!(
            report
                .error
                .unwrap()
                .contains("no longer one of the touchpoint's templates")
        );
        assert!(stub.seen(SEND).is_empty());
    }

    #[tokio::test]
    async fn a_probe_gets_a_token_and_finds_the_agent() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let stub = Arc::new(Stub::default());
        stub.then(
            "/cgi-bin/agent/get",
            200,
            json!({"errcode": 0, "errmsg": "ok", "agentid": 1000005, "name": "门店助手"}),
        );
        let ch = live(
            &stub,
            &format!("audience = \"customers\"\ncontact_secret = {{ env = \"UNUSED\" }}\n{TEXT}"),
        )
        .await;
        assert_eq!(
            ch.probe(&client).await,
            Ok("corp ww4f1e2d3c4b5a6978: `secret` gets a token; agent 1000005 (门店助手) exists; `contact_secret` gets a token".into())
        );
        assert_eq!(
            stub.seen("/cgi-bin/agent/get")[0].0,
            "access_token=app-token-0&agentid=1000005"
        );
        stub.then(
            "/cgi-bin/agent/get",
            200,
            json!({"errcode": 40056, "errmsg": "invalid agentid"}),
        );
        let e = ch.probe(&client).await.unwrap_err();
        assert!(
            e.starts_with("agent/get: 40056 invalid agentid: agent 1000005 is not an app of corp"),
            "{e}"
        );
        let ch = live(&stub, TEXT).await;
        stub.then(
            TOKEN,
            200,
            json!({"errcode": 40013, "errmsg": "invalid corpid"}),
        );
        let e = ch.probe(&client).await.unwrap_err();
        assert!(
            e.starts_with("gettoken with `secret`: 40013 invalid corpid: WeCom does not know")
                && !e.contains(SECRET),
            "{e}"
        );
    }
}
