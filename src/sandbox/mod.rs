//! `touchctl sandbox`: local stand-ins for the WeChat Official Account, open platform, WeCom and
//! Getui APIs and a webhook sink for custom touchpoints, speaking the real wire formats at the real
//! paths (CHANNELS.md), so the whole system runs without accounts. It is a developer tool and a test
//! fixture: nothing here is on a production path, and it holds nothing between runs.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the server: routes, shared state, request bodies, `/_sandbox/messages` and `/_sandbox/faults` |
//! | [`accounts`] | the credentials of the touchpoints it serves, read from a loaded tree |
//! | [`tokens`] | access tokens with the platforms' lifetimes; idempotency windows |
//! | [`faults`] | injected failures: rules, their checks, what they make of a request |
//! | [`messages`] | the bounded log of what it received |
//! | `wechat.rs` | OA: `/cgi-bin/token`, `/cgi-bin/message/template/send`, `/cgi-bin/wxopen/wxamplinkget` |
//! | `open_platform.rs` | the open platform's component endpoints and what it remembers (tickets, codes, authorisations) |
//! | `consent.rs` | the authorisation page an administrator opens, and its authorise link |
//! | `push.rs` | encrypted pushes to the platform's event URL: verify tickets, authorisation events |
//! | `wecom.rs` | WeCom: `gettoken`, `message/send`, `externalcontact/add_msg_template` |
//! | `getui.rs` | Getui v2: `auth`, `push/list/message`, `push/list/cid` |
//! | `sink.rs` | custom touchpoints: `/_sandbox/webhooks/NAME` with the Bearer and signature checks |
//!
//! Every request takes the shared state's locks only for the moment it reads or writes them,
//! never across an await (a `slow` fault waits with no lock held), so sends are served at loopback
//! speed. Request bodies are read from bytes whatever their `Content-Type` (wechatpy sends none),
//! at most [`MAX_BODY`] (413 beyond).

pub mod accounts;
pub mod faults;
pub mod messages;
pub mod tokens;

mod consent;
mod getui;
mod open_platform;
mod push;
mod sink;
mod wechat;
mod wecom;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

pub use accounts::{Accounts, Notice};
use faults::{Endpoint, Faults, Verdict};
use messages::{Entry, Filter, Kind, Messages};
pub use push::check_url as check_push_url;
use tokens::{Recent, Tokens};

/// The largest request body read (413 beyond).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// WeChat and WeCom tokens' lifetime (`expires_in` 7200).
pub const WECHAT_TOKEN_TTL: Duration = Duration::from_secs(7200);

/// Getui tokens' lifetime (`expire_time` is a day ahead).
pub const GETUI_TOKEN_TTL: Duration = Duration::from_secs(86_400);

/// How long an OA `client_msg_id` is remembered for a recipient.
const OA_DEDUP: Duration = Duration::from_secs(600);

/// How long a custom webhook's `webhook-id` (and a Getui `request_id`) is remembered.
const DAY: Duration = Duration::from_secs(86_400);

/// The most idempotency keys each window remembers.
const MAX_KEYS: usize = 1_000_000;

/// A channel the sandbox serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// WeChat Official Account.
    Oa,
    /// WeCom.
    Wecom,
    /// Getui.
    Getui,
    /// Custom touchpoints' sink.
    Custom,
    /// The WeChat open platform's component endpoints.
    OpenPlatform,
}

impl Channel {
    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Oa => "oa",
            Channel::Wecom => "wecom",
            Channel::Getui => "getui",
            Channel::Custom => "custom",
            Channel::OpenPlatform => "open_platform",
        }
    }

    /// Reads a channel name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "oa" => Some(Channel::Oa),
            "wecom" => Some(Channel::Wecom),
            "getui" => Some(Channel::Getui),
            "custom" => Some(Channel::Custom),
            "open_platform" => Some(Channel::OpenPlatform),
            _ => None,
        }
    }
}

/// How the sandbox runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Shortens token lifetimes (WeChat and WeCom 7200s, Getui a day, when longer).
    pub token_ttl: Option<Duration>,
    /// The most entries the messages log keeps.
    pub max_messages: usize,
    /// Where the open platforms' pushes go (`{platform}` replaced by the platform's id).
    pub push_tickets_to: Option<String>,
    /// How often a verify ticket is pushed.
    pub ticket_interval: Duration,
}

/// How often a verify ticket is pushed unless told otherwise, as WeChat does.
pub const TICKET_INTERVAL: Duration = Duration::from_secs(600);

impl Default for Options {
    fn default() -> Self {
        Self {
            token_ttl: None,
            max_messages: messages::MAX_ENTRIES,
            push_tickets_to: None,
            ticket_interval: TICKET_INTERVAL,
        }
    }
}

/// The state every request shares.
struct Sandbox {
    accounts: Accounts,
    /// The touchpoint ids, shared by the log entries: per channel, by account index.
    names: HashMap<Channel, Vec<Arc<str>>>,
    wechat_ttl: Duration,
    getui_ttl: Duration,
    tokens: Mutex<Tokens>,
    messages: Mutex<Messages>,
    faults: Mutex<Faults>,
    /// OA: (account, touser, client_msg_id) → the msgid first answered.
    oa_sent: Mutex<Recent<(usize, String, String), u64>>,
    /// Custom: (account, webhook-id) seen.
    webhooks: Mutex<Recent<(usize, String), ()>>,
    getui: Mutex<getui::Tasks>,
    /// The open platforms' tickets, codes and authorisations.
    open: Mutex<open_platform::Memory>,
    /// Pre-auth codes' lifetime (1800s, or `--token-ttl` when shorter).
    pre_auth_ttl: Duration,
    /// Authorisation codes' lifetime (600s, or `--token-ttl` when shorter).
    auth_code_ttl: Duration,
    /// Where pushes go, and the client that sends them.
    pusher: push::Pusher,
    next_msgid: AtomicU64,
    stop: watch::Receiver<bool>,
}

type Shared = Arc<Sandbox>;

/// Takes a lock, also one a panicking request left poisoned (every critical section leaves its
/// data whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the epoch.
fn now() -> i64 {
    crate::store::now_ms()
}

impl Sandbox {
    fn new(accounts: Accounts, options: &Options, stop: watch::Receiver<bool>) -> Self {
        let ids = |v: Vec<&str>| v.into_iter().map(Arc::from).collect::<Vec<Arc<str>>>();
        let names = HashMap::from([
            (
                Channel::Oa,
                ids(accounts.oa.iter().map(|a| a.id.as_str()).collect()),
            ),
            (
                Channel::Wecom,
                ids(accounts.wecom.iter().map(|a| a.id.as_str()).collect()),
            ),
            (
                Channel::Getui,
                ids(accounts.getui.iter().map(|a| a.id.as_str()).collect()),
            ),
            (
                Channel::Custom,
                ids(accounts.sinks.iter().map(|a| a.id.as_str()).collect()),
            ),
            (
                Channel::OpenPlatform,
                ids(accounts.platforms.iter().map(|a| a.id.as_str()).collect()),
            ),
        ]);
        let shorten = |default: Duration| options.token_ttl.map_or(default, |t| t.min(default));
        let platforms = accounts.platforms.len();
        Self {
            accounts,
            names,
            wechat_ttl: shorten(WECHAT_TOKEN_TTL),
            getui_ttl: shorten(GETUI_TOKEN_TTL),
            tokens: Mutex::default(),
            messages: Mutex::new(Messages::new(options.max_messages, messages::MAX_BYTES)),
            faults: Mutex::default(),
            oa_sent: Mutex::new(Recent::new(OA_DEDUP, MAX_KEYS)),
            webhooks: Mutex::new(Recent::new(DAY, MAX_KEYS)),
            getui: Mutex::new(getui::Tasks::new(MAX_KEYS)),
            open: Mutex::new(open_platform::Memory::new(platforms)),
            pre_auth_ttl: shorten(open_platform::PRE_AUTH_TTL),
            auth_code_ttl: shorten(open_platform::AUTH_CODE_TTL),
            pusher: push::Pusher::new(options.push_tickets_to.clone()),
            next_msgid: AtomicU64::new(first_msgid()),
            stop,
        }
    }

    /// The touchpoint id of a channel's account.
    fn name(&self, channel: Channel, account: usize) -> Option<Arc<str>> {
        self.names.get(&channel)?.get(account).cloned()
    }

    /// Whether a touchpoint of `channel` is served.
    fn serves(&self, channel: Channel, id: &str) -> bool {
        self.names
            .get(&channel)
            .is_some_and(|v| v.iter().any(|n| &**n == id))
    }

    /// What the faults make of a request, after waiting out any `slow` delay (cut short when the
    /// sandbox stops).
    async fn faults(&self, entry: &Entry, endpoint: Endpoint, recipients: &[String]) -> Verdict {
        let verdict = lock(&self.faults).verdict(
            entry.channel,
            entry.touchpoint.as_deref(),
            endpoint,
            recipients,
        );
        if !verdict.delay.is_zero() {
            let mut stop = self.stop.clone();
            tokio::select! {
                () = tokio::time::sleep(verdict.delay) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        verdict
    }

    fn record(&self, entry: Entry) {
        lock(&self.messages).push(entry);
    }

    /// A new numeric message id.
    fn msgid(&self) -> u64 {
        self.next_msgid.fetch_add(1, Ordering::Relaxed)
    }
}

/// Message ids start at a random point, as a platform's do not start at 1.
fn first_msgid() -> u64 {
    let hex = crate::store::random_hex(4);
    1_000_000_000 + u64::from_str_radix(&hex, 16).unwrap_or(0) % 1_000_000_000
}

/// Serves the sandbox on `listener` until `shutdown` completes; open requests are answered first
/// (a `slow` fault's wait is cut short).
pub async fn serve(
    listener: tokio::net::TcpListener,
    accounts: Accounts,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = Arc::new(Sandbox::new(accounts, &options, stop_rx));
    if !state.accounts.platforms.is_empty() {
        tokio::spawn(push::tickets_every(state.clone(), options.ticket_interval));
    }
    let app = router(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/cgi-bin/token", get(wechat::token))
        .route(
            "/cgi-bin/message/template/send",
            post(wechat::template_send),
        )
        .route("/cgi-bin/wxopen/wxamplinkget", post(wechat::wxamplinkget))
        .route(
            "/cgi-bin/component/api_component_token",
            post(open_platform::component_token),
        )
        .route(
            "/cgi-bin/component/api_create_preauthcode",
            post(open_platform::create_preauthcode),
        )
        .route(
            "/cgi-bin/component/api_query_auth",
            post(open_platform::query_auth),
        )
        .route(
            "/cgi-bin/component/api_authorizer_token",
            post(open_platform::authorizer_token),
        )
        .route(
            "/cgi-bin/component/api_get_authorizer_info",
            post(open_platform::get_authorizer_info),
        )
        .route("/cgi-bin/componentloginpage", get(consent::page))
        .route("/safe/bindcomponent", get(consent::page))
        .route("/wxaopen/safe/bindcomponent", get(consent::page))
        .route("/_sandbox/authorize", get(consent::authorize))
        .route("/_sandbox/tickets", post(push::tickets_now))
        .route("/cgi-bin/gettoken", get(wecom::token))
        .route("/cgi-bin/message/send", post(wecom::message_send))
        .route("/cgi-bin/agent/get", get(wecom::agent_get))
        .route(
            "/cgi-bin/externalcontact/add_msg_template",
            post(wecom::add_msg_template),
        )
        .route("/v2/{app_id}/auth", post(getui::auth))
        .route("/v2/{app_id}/push/list/message", post(getui::list_message))
        .route("/v2/{app_id}/push/list/cid", post(getui::list_cid))
        .route("/_sandbox/webhooks/{name}", post(sink::webhook))
        .route("/_sandbox/messages", get(list_messages))
        .route(
            "/_sandbox/faults",
            get(list_faults).post(add_faults).delete(clear_faults),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The sandbox's own answers' content type.
const JSON: &str = "application/json";

/// A JSON answer with a content type of the caller's choice.
fn json_answer(status: StatusCode, content_type: &'static str, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The sandbox's own error answer.
fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    json_answer(status, JSON, &json!({ "error": message.into() }))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        format!(
            "the sandbox serves no {method} {}: it serves the OA (/cgi-bin/token, /cgi-bin/message/template/send, /cgi-bin/wxopen/wxamplinkget), the open platform (/cgi-bin/component/api_component_token, api_create_preauthcode, api_query_auth, api_authorizer_token, api_get_authorizer_info; the authorisation page /cgi-bin/componentloginpage, /safe/bindcomponent, /wxaopen/safe/bindcomponent; /_sandbox/tickets), WeCom (/cgi-bin/gettoken, /cgi-bin/message/send, /cgi-bin/externalcontact/add_msg_template) and Getui (/v2/{{appId}}/auth, /v2/{{appId}}/push/list/message, /v2/{{appId}}/push/list/cid) endpoints, /_sandbox/webhooks/NAME, /_sandbox/messages and /_sandbox/faults",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    problem(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// A request body, at most [`MAX_BODY`]: the 413 answer beyond it, or a 400 when the connection
/// fails half-way.
async fn read_body(body: Body) -> Result<Bytes, Response> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {MAX_BODY} bytes, the most the sandbox reads"),
        )),
        Err(e) => Err(problem(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// Starts the log entry of a request to a platform or sink endpoint and reads its body; a body
/// over [`MAX_BODY`] is logged with its 413 answer.
async fn receive(
    s: &Sandbox,
    channel: Channel,
    kind: Kind,
    endpoint: &str,
    body: Body,
) -> Result<(Entry, Bytes), Response> {
    match read_body(body).await {
        Ok(bytes) => Ok((
            Entry::new(channel, kind, endpoint.to_string(), &bytes),
            bytes,
        )),
        Err(r) => {
            let mut entry = Entry::new(channel, kind, endpoint.to_string(), b"");
            entry.answer.http_status = r.status().as_u16();
            s.record(entry);
            Err(r)
        }
    }
}

/// Whether `given` is the secret, compared in constant time.
fn same_secret(given: &str, secret: &crate::model::Secret) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(secret.expose().as_bytes()).into()
}

/// The answer to a request a fault refuses, for a platform whose answer to a code `error` makes
/// (and logs): a rate limit answers its code (`default_rate` when the rule gave none); an error
/// answers its code, with the rule's HTTP status when it gave one (a bare status answers a short
/// page, as a proxy in front of the platform would).
fn refuse(
    entry: &mut Entry,
    refusal: faults::Refusal,
    default_rate: i64,
    error: impl FnOnce(&mut Entry, i64) -> Response,
) -> Response {
    use faults::Refusal;
    match refusal {
        Refusal::RateLimit(code) => error(entry, code.unwrap_or(default_rate)),
        Refusal::Error {
            code,
            http_status: None,
        } => error(entry, code.unwrap_or(-1)),
        Refusal::Error {
            code,
            http_status: Some(status),
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut r = match code {
                Some(c) => error(entry, c),
                None => status_page(status),
            };
            *r.status_mut() = status;
            entry.answer.http_status = status.as_u16();
            entry.answer.code = code;
            r
        }
    }
}

/// A bare HTTP status as a proxy answers it: a short HTML page.
fn status_page(status: StatusCode) -> Response {
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let page = format!(
        "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n</body>\r\n</html>\r\n"
    );
    let mut r = (status, page).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    r
}

/// The query's parameters (the first of each name).
fn query(raw: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

/// A JSON body read from bytes as UTF-8, whatever the request's content type.
fn parse_json(body: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// Random lowercase hex, for ids and the parts of error messages that vary.
fn hex(bytes: usize) -> String {
    crate::store::random_hex(bytes)
}

/// A token's value: URL-safe characters, as long as `bytes` random bytes in base64.
fn token_value(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // The OS random source is not expected to fail; hex from the same source is the fallback.
        return hex(bytes);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

async fn list_messages(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let mut filter = Filter::default();
    for (k, v) in query(q.as_deref()) {
        match k.as_str() {
            "channel" => match Channel::parse(&v) {
                Some(c) => filter.channel = Some(c),
                None => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "unknown channel `{v}`: use oa, wecom, getui, custom or open_platform"
                        ),
                    );
                }
            },
            "kind" => match Kind::parse(&v) {
                Some(kind) => filter.kind = Some(kind),
                None => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        format!("unknown kind `{v}`: use token, message or query"),
                    );
                }
            },
            "touchpoint" => filter.touchpoint = Some(v),
            other => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown parameter `{other}`: /_sandbox/messages takes channel, touchpoint and kind"
                    ),
                );
            }
        }
    }
    #[derive(Serialize)]
    struct Page {
        messages: messages::Listed,
    }
    let page = Page {
        messages: messages::Listed(lock(&s.messages).list(&filter)),
    };
    match serde_json::to_vec(&page) {
        Ok(body) => {
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
            r
        }
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list_faults(State(s): State<Shared>) -> Response {
    let active = lock(&s.faults).to_json();
    json_answer(StatusCode::OK, JSON, &active)
}

async fn add_faults(State(s): State<Shared>, body: Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let rules = match faults::parse(&body, |c, id| s.serves(c, id)) {
        Ok(r) => r,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // A revocation must name an account that has authorised: checked before anything is added.
    let revocations = match open_platform::revocations(&s, &rules) {
        Ok(r) => r,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let (once, active) = {
        let mut f = lock(&s.faults);
        let once = f.add(rules);
        (once, f.to_json())
    };
    let now = now();
    for rule in once {
        let account = rule
            .touchpoint
            .as_deref()
            .and_then(|t| s.names.get(&rule.channel)?.iter().position(|n| &**n == t));
        match (&rule.action, rule.channel) {
            (faults::Action::ExpireTokens, Channel::OpenPlatform) => {
                open_platform::expire_tokens(&s, account, now);
            }
            (faults::Action::ExpireTokens, channel) => {
                lock(&s.tokens).expire(channel, account, now);
            }
            (faults::Action::ExpireTicket, _) => lock(&s.open).expire_tickets(account),
            // Acted on below, once each account is known.
            _ => {}
        }
    }
    for oa in revocations {
        open_platform::revoke(&s, oa, now).await;
    }
    json_answer(StatusCode::OK, JSON, &active)
}

async fn clear_faults(State(s): State<Shared>) -> Response {
    lock(&s.faults).clear();
    json_answer(StatusCode::OK, JSON, &json!([]))
}
