//! The channels touchpoints deliver through, one file each, behind one abstraction: [`Channel`].
//! A channel owns everything about its platform: how a trigger's message is checked, how a batch's
//! recipients are grouped into requests, how requests are built, signed and sent (with the
//! platform's access token, cached in [`token::Tokens`]), and how each answer is read into
//! per-recipient outcomes and touchpoint-level signals ([`Report`]). The sender in
//! [`crate::dispatch`] knows none of this: it hands a channel a batch and records the report.
//! Nothing here knows about plans or the queue; `dispatch` uses `channel`, never the reverse.
//!
//! A batch reaches a channel as its recipients written as JSON objects, separated by commas:
//! `{"user_id": "u1", "<dynamic param>": <value>, ...},{...}` (the form the custom touchpoint's
//! request carries, see [`recipients`]).
//!
//! | file | channel |
//! |---|---|
//! | [`custom`] | a customer's HTTP endpoint (Standard Webhooks) |
//! | [`wechat`] | WeChat Official Account template messages (direct mode) |
//! | [`wecom`] | WeCom app messages and customer-contact mass messages |
//! | [`getui`] | Getui push v2 list pushes |
//! | [`open_platform`] | the WeChat open platform: message crypto, authorisation events, the component API client and the live platforms |
//! | [`template`] | templates and `{{name}}` placeholders, shared by the kinds that have them |
//! | [`answer`] | reading answers: capped bodies, excerpts, network errors, `Retry-After` |
//! | [`token`] | the access-token cache: one fetch at a time per credential, refreshed before expiry, shared with other daemons through the registry |
//! | [`net_guard`] | which addresses requests may go to |

pub mod answer;
pub mod custom;
pub mod getui;
pub mod net_guard;
pub mod open_platform;
pub mod template;
pub mod token;
pub mod wechat;
pub mod wecom;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{KindSpec, PushProvider, Retry, SecretPolicy, Touchpoint};

/// What a trigger asks to send besides its template params: the template it names and, for app
/// push, the notification's text (DESIGN.md section 5, "Triggers for every kind").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// The `id` of one of the touchpoint's `[[templates]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// App push: the notification title, instead of the touchpoint's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// App push: the notification body, instead of the touchpoint's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// App push: data for the app (Getui `payload` click type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

impl Message {
    /// Whether the trigger asked for nothing beyond template params.
    pub fn is_empty(&self) -> bool {
        self == &Message::default()
    }
}

/// One batch, as a channel sends it.
pub struct Outgoing<'a> {
    /// The HTTP client (shared, with the network guard's resolver).
    pub client: &'a reqwest::Client,
    /// The batch id: the same on every attempt, so platforms that deduplicate (`webhook-id`,
    /// `client_msg_id`, `request_id`) can drop a second copy.
    pub batch_id: &'a str,
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
    /// The trigger's template params, as stored (a JSON object).
    pub template_params: &'a str,
    /// The trigger's message.
    pub message: &'a Message,
    /// The recipients still to deliver, as JSON objects separated by commas (see the module doc).
    pub recipients: &'a [u8],
    /// How many recipients that is.
    pub recipient_count: u32,
}

impl Outgoing<'_> {
    /// The recipients, parsed. Channels that address each recipient read them this way.
    pub fn parsed_recipients(&self) -> Result<Vec<Map<String, Value>>, String> {
        let mut text = Vec::with_capacity(self.recipients.len() + 2);
        text.push(b'[');
        text.extend_from_slice(self.recipients);
        text.push(b']');
        serde_json::from_slice(&text).map_err(|e| {
            format!("the batch's recipients cannot be read ({e}); this is a touchctl bug, please report it")
        })
    }

    /// The template params, parsed (an empty object when there are none).
    pub fn params(&self) -> Map<String, Value> {
        serde_json::from_str(self.template_params).unwrap_or_default()
    }
}

/// A recipient that was not delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Miss {
    /// The recipient's `user_id`.
    pub user_id: String,
    /// Whether sending it again may succeed (it is kept for a retry) or it failed for good.
    pub retry: bool,
    /// What the platform said, its code first (`43004 require subscribe`).
    pub reason: String,
}

/// What became of the recipients a [`Report`] does not name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rest {
    /// Delivered.
    Delivered,
    /// Not delivered; worth trying again, not before `after` if given.
    Retry {
        /// The platform's wait (`Retry-After`).
        after: Option<Duration>,
    },
    /// Not delivered, and sending the same again will not succeed: the batch is dead-lettered
    /// (replayable once the cause is fixed).
    Dead,
}

/// Something about the whole touchpoint, not one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Send nothing to this touchpoint for `wait` (a rate limit, a daily quota); the recipients
    /// left are sent after it. Not counted as an attempt.
    Wait {
        /// How long.
        wait: Duration,
        /// The platform's code.
        code: String,
        /// What the platform said, and what happens next.
        reason: String,
    },
    /// The platform rejected the touchpoint's configuration (a bad secret, template id, IP not
    /// whitelisted): hold it, its batches parked, until a changed spec or credential is applied or
    /// it is resumed. Not counted as an attempt.
    Hold {
        /// The platform's code.
        code: String,
        /// What the platform said, and what to change.
        reason: String,
    },
}

impl Signal {
    /// The platform's code.
    pub fn code(&self) -> &str {
        match self {
            Signal::Wait { code, .. } | Signal::Hold { code, .. } => code,
        }
    }

    /// What the platform said.
    pub fn reason(&self) -> &str {
        match self {
            Signal::Wait { reason, .. } | Signal::Hold { reason, .. } => reason,
        }
    }

    /// What the platform said, its code first.
    pub fn said(&self) -> String {
        code_first(self.code(), self.reason())
    }
}

/// `reason` with `code` in front, unless it starts with it already (channels put the code first
/// in their reasons; it is not said twice).
pub fn code_first(code: &str, reason: &str) -> String {
    if reason.starts_with(code) {
        reason.to_string()
    } else {
        format!("{code} {reason}")
    }
}

/// What a channel made of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The HTTP status of the last answer, for the attempt log.
    pub status: Option<u16>,
    /// The recipients not delivered, each with what became of it. Ids that are not in the batch
    /// are ignored.
    pub misses: Vec<Miss>,
    /// What became of every other recipient.
    pub rest: Rest,
    /// What went wrong, for the attempt log (no secret, no recipient data).
    pub error: Option<String>,
    /// Something about the whole touchpoint.
    pub signal: Option<Signal>,
}

impl Report {
    /// Every recipient delivered.
    pub fn delivered(status: Option<u16>) -> Self {
        Report {
            status,
            misses: Vec::new(),
            rest: Rest::Delivered,
            error: None,
            signal: None,
        }
    }

    /// Nothing delivered; the whole batch is tried again later.
    pub fn retry(status: Option<u16>, after: Option<Duration>, error: impl Into<String>) -> Self {
        Report {
            status,
            misses: Vec::new(),
            rest: Rest::Retry { after },
            error: Some(error.into()),
            signal: None,
        }
    }

    /// Nothing delivered, and trying again will not help: dead-lettered.
    pub fn dead(status: Option<u16>, error: impl Into<String>) -> Self {
        Report {
            status,
            misses: Vec::new(),
            rest: Rest::Dead,
            error: Some(error.into()),
            signal: None,
        }
    }

    /// Nothing delivered; the touchpoint is held (see [`Signal::Hold`]).
    pub fn hold(status: Option<u16>, code: impl Into<String>, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Report {
            status,
            misses: Vec::new(),
            rest: Rest::Retry { after: None },
            error: Some(reason.clone()),
            signal: Some(Signal::Hold {
                code: code.into(),
                reason,
            }),
        }
    }

    /// Nothing delivered; the touchpoint waits (see [`Signal::Wait`]).
    pub fn wait(
        status: Option<u16>,
        wait: Duration,
        code: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        let reason = reason.into();
        Report {
            status,
            misses: Vec::new(),
            rest: Rest::Retry { after: None },
            error: Some(reason.clone()),
            signal: Some(Signal::Wait {
                wait,
                code: code.into(),
                reason,
            }),
        }
    }
}

/// A live touchpoint's channel: everything sending to it needs, its secrets resolved.
pub trait Channel: Send + Sync + 'static {
    /// Recipients per stored batch: the most one batch sends (custom: `batch_size`; OA: a batch
    /// is sent one request per recipient; WeCom: 1000 `userid`s a request; Getui: `batch_size`).
    fn batch_size(&self) -> usize;

    /// The base URL requests go to, checked by the network guard before each batch.
    fn endpoint(&self) -> &str;

    /// The retry policy of its batches.
    fn retry(&self) -> Retry {
        Retry::default()
    }

    /// Requests per second at most, if limited.
    fn rate_limit(&self) -> Option<f64> {
        None
    }

    /// Checks a trigger's message and template params against the touchpoint; every problem is
    /// named (the API answers 422 with them).
    fn check(&self, message: &Message, params: &Map<String, Value>) -> Result<(), Vec<String>>;

    /// Sends one batch: every recipient in it gets an outcome in the report.
    fn send<'a>(&'a self, batch: Outgoing<'a>) -> BoxFuture<'a, Report>;

    /// Checks the touchpoint's configuration live, for `plan --refresh`: its credentials get a
    /// token, the app exists. `Ok` with what was checked, or the problem in words (the platform's
    /// code first, no secret). Channels without credentials to check answer `Ok`.
    fn probe<'a>(&'a self, client: &'a reqwest::Client) -> BoxFuture<'a, Result<String, String>> {
        let _ = client;
        Box::pin(async { Ok(String::new()) })
    }
}

/// What channels share across touchpoints and across reloads of the same touchpoint.
#[derive(Default)]
pub struct Shared {
    /// Access tokens, by credential.
    pub tokens: token::Tokens,
    /// The live open platforms, by id: an Official Account in third-party mode gets its tokens
    /// through the one it names.
    pub platforms: open_platform::Platforms,
}

impl Shared {
    /// Sharing `tokens` (a cache that keeps its tokens in the registry, say).
    pub fn with_tokens(tokens: token::Tokens) -> Self {
        Shared {
            tokens,
            platforms: open_platform::Platforms::default(),
        }
    }
}

/// Why a touchpoint cannot get a channel now; it is held with this reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// A channel for `touchpoint`, its secrets resolved as `policy` allows, secret file references
/// relative to `base` (the folder of the file it was applied from).
pub fn open(
    touchpoint: &Touchpoint,
    base: &Path,
    policy: &SecretPolicy,
    shared: &Arc<Shared>,
) -> Result<Arc<dyn Channel>, Unavailable> {
    match &touchpoint.spec {
        KindSpec::Custom(spec) => Ok(Arc::new(custom::CustomChannel::open(spec, base, policy)?)),
        KindSpec::WechatOfficialAccount(spec) => Ok(Arc::new(wechat::WechatChannel::open(
            touchpoint.id(),
            spec,
            base,
            policy,
            shared,
        )?)),
        KindSpec::Wecom(spec) => Ok(Arc::new(wecom::WecomChannel::open(
            spec, base, policy, shared,
        )?)),
        KindSpec::AppPush(spec) => match spec.provider {
            PushProvider::Getui => Ok(Arc::new(getui::GetuiChannel::open(
                spec, base, policy, shared,
            )?)),
        },
        KindSpec::WechatOpenPlatform(_) => Err(Unavailable(
            "a wechat_open_platform is not a touchpoint: nothing is dispatched to it; send through an Official Account that names it in `auth.platform`".into(),
        )),
    }
}

/// A batch's recipients written as the channels receive them (see the module doc).
pub fn recipients<'a>(objects: impl IntoIterator<Item = &'a Map<String, Value>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, o) in objects.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Writing a map to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, o);
    }
    out
}
