//! The WeChat open platform's component endpoints (CHANNELS.md §2.2–2.7), answered as
//! `api.weixin.qq.com` answers them, and what the platform remembers: the verify tickets it pushed,
//! pre-auth codes, authorisation codes and each account's authorisation. The component token is
//! taken from `?component_access_token=` (wechatpy, older docs) or `?access_token=` (newer docs);
//! 41001 when neither is given, 40001 unknown, 42001 expired.
//!
//! - `api_component_token` `{component_appid, component_appsecret, component_verify_ticket}`:
//!   41002 / 61011 app id missing / unknown; 41004 / 40125 secret missing / wrong; 61006 a ticket
//!   the sandbox never pushed (or long forgotten); 61005 a ticket older than 12 hours or expired by
//!   `expire_ticket`. Every ticket pushed in the last 12 hours is valid (the last
//!   [`KEPT_TICKETS`]), so a push the receiver missed locks nobody out.
//! - `api_create_preauthcode`: a single-use `pre_auth_code` for 1800 s.
//! - `api_query_auth` `{authorization_code}`: 61009 unknown or used, 61010 expired; otherwise the
//!   authorisation: an authorizer token, the refresh token and `func_info`.
//! - `api_authorizer_token` `{authorizer_appid, authorizer_refresh_token}`: 61023 a refresh token
//!   that is unknown, revoked, replaced by a newer authorisation, or another account's; otherwise a
//!   new authorizer token and the same refresh token.
//! - `api_get_authorizer_info` `{authorizer_appid}`: 61003 an account that has not authorised the
//!   platform; otherwise the Official Account's profile and its `func_info`.
//!
//! A `component_appid` in a body that is not the token's platform answers 61011. An authorizer
//! token is owned by its Official Account, so `/cgi-bin/message/template/send` takes it (48001
//! when permission set 7, 群发与通知, was not granted). Granted permission sets are those the
//! authorisation link asked for (`category_id_list`, by default the eight the console asks for),
//! that an Official Account can grant, and that no `grant_only` fault leaves out.
//!
//! The log (`channel` `open_platform`) keeps bodies with the secret values replaced:
//! `component_appsecret`, `component_verify_ticket`, `authorizer_refresh_token`,
//! `authorization_code`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::faults::{Action, Endpoint, FaultError, Rule};
use super::messages::{Entry, Kind};
use super::tokens::{Owner, Standing};
use super::wechat::{error, reply};
use super::{Channel, Sandbox, Shared, lock, now, parse_json, query, receive, refuse, same_secret};
use crate::channel::open_platform::event::Event;

/// A pre-auth code's lifetime.
pub const PRE_AUTH_TTL: Duration = Duration::from_secs(1800);

/// An authorisation code's lifetime (`expires_in=600` on the redirect).
pub const AUTH_CODE_TTL: Duration = Duration::from_secs(600);

/// A verify ticket's lifetime.
pub const TICKET_TTL: Duration = Duration::from_secs(12 * 3600);

/// Tickets remembered per platform (older ones answer 61006).
pub const KEPT_TICKETS: usize = 128;

/// Codes (pre-auth and authorisation) remembered at most, per kind.
const MAX_CODES: usize = 10_000;

/// How long a used or expired code is still told apart from an unknown one.
const REMEMBER_MS: i64 = 86_400_000;

/// The permission sets an authorisation asks for unless its link says otherwise: the eight the
/// console requires.
pub const DEFAULT_CATEGORIES: [u32; 8] = [1, 2, 3, 4, 7, 11, 15, 24];

/// 群发与通知: template messages need it.
const TEMPLATE_MESSAGES: u32 = 7;

/// 小程序关联管理: listing the linked mini programs needs it.
const MINI_PROGRAM_LINKS: u32 = 33;

/// The permission sets an Official Account can grant a third-party platform, with their
/// labels (CHANNELS.md §2.8).
pub const PERMISSION_SETS: &[(u32, &str)] = &[
    (1, "消息管理"),
    (2, "用户管理"),
    (3, "帐号服务"),
    (4, "网页服务"),
    (5, "微信小店"),
    (6, "微信多客服"),
    (7, "群发与通知"),
    (8, "微信卡券"),
    (9, "微信扫一扫"),
    (10, "微信连WIFI"),
    (11, "素材管理"),
    (12, "微信摇周边"),
    (13, "微信门店"),
    (15, "自定义菜单"),
    (22, "城市服务"),
    (23, "广告管理"),
    (24, "开放平台帐号管理"),
    (26, "微信电子发票"),
    (27, "快速注册小程序"),
    (33, "小程序关联管理"),
    (34, "微信商品库管理"),
    (44, "好物圈"),
    (46, "微信一物一码"),
    (47, "微信财政电子票据"),
    (54, "服务号对话管理"),
    (66, "微信服务市场管理"),
    (89, "服务号订阅通知"),
    (113, "就医助手"),
];

/// The label of an Official Account permission set.
pub fn label(id: u32) -> Option<&'static str> {
    PERMISSION_SETS
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, l)| *l)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug)]
struct Ticket {
    value: String,
    issued_ms: i64,
    expired: bool,
}

/// What a verify ticket is when it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketStanding {
    /// Pushed in the last 12 hours and not expired by a fault.
    Valid,
    /// Pushed, expired since (61005).
    Expired,
    /// Never pushed for this platform, or forgotten (61006).
    Unknown,
}

#[derive(Debug)]
struct PreAuth {
    platform: usize,
    expires_ms: i64,
    used: bool,
}

/// Why a pre-auth code cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreAuthProblem {
    /// Never issued to this platform (or long forgotten).
    Unknown,
    /// Used by an authorisation already.
    Used,
    /// Past its lifetime.
    Expired,
}

#[derive(Debug)]
struct AuthCode {
    platform: usize,
    oa: usize,
    expires_ms: i64,
    used: bool,
}

/// An Official Account's current authorisation of its platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The refresh token that works now.
    pub refresh_token: String,
    /// The permission set ids granted, ascending.
    pub granted: Vec<u32>,
}

/// An authorisation an administrator gives on the page.
#[derive(Debug)]
pub struct Authorisation<'a> {
    /// The platform's index.
    pub platform: usize,
    /// The Official Account's index.
    pub oa: usize,
    /// The pre-auth code of the link it came through.
    pub pre_auth: &'a str,
    /// The permission set ids granted, ascending.
    pub granted: Vec<u32>,
    /// The authorisation code it issues.
    pub auth_code: String,
    /// The refresh token it issues.
    pub refresh_token: String,
}

/// What the open platforms remember. Time is passed in (milliseconds since the epoch), so that
/// expiry is tested without waiting.
#[derive(Debug, Default)]
pub struct Memory {
    /// Per platform, newest last.
    tickets: Vec<VecDeque<Ticket>>,
    pre_auth: HashMap<String, PreAuth>,
    auth_codes: HashMap<String, AuthCode>,
    /// By Official Account index.
    grants: HashMap<usize, Grant>,
    /// Refresh token → Official Account index.
    refresh: HashMap<String, usize>,
}

/// Forgets what is long past its lifetime, then the soonest to expire beyond the cap.
fn prune<V>(map: &mut HashMap<String, V>, now: i64, expires: impl Fn(&V) -> i64) {
    map.retain(|_, v| expires(v).saturating_add(REMEMBER_MS) > now);
    while map.len() >= MAX_CODES {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| expires(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Memory {
    /// The state of `platforms` platforms, nothing pushed or authorised yet.
    pub fn new(platforms: usize) -> Self {
        Self {
            tickets: (0..platforms).map(|_| VecDeque::new()).collect(),
            ..Self::default()
        }
    }

    /// Remembers a ticket pushed (or about to be) for `platform` at `now`.
    pub fn add_ticket(&mut self, platform: usize, value: String, now: i64) {
        if let Some(list) = self.tickets.get_mut(platform) {
            list.push_back(Ticket {
                value,
                issued_ms: now,
                expired: false,
            });
            while list.len() > KEPT_TICKETS {
                list.pop_front();
            }
        }
    }

    /// What `value` is as `platform`'s ticket at `now`.
    pub fn ticket(&self, platform: usize, value: &str, now: i64) -> TicketStanding {
        let Some(t) = self
            .tickets
            .get(platform)
            .and_then(|l| l.iter().find(|t| t.value == value))
        else {
            return TicketStanding::Unknown;
        };
        if t.expired || t.issued_ms.saturating_add(ms(TICKET_TTL)) <= now {
            TicketStanding::Expired
        } else {
            TicketStanding::Valid
        }
    }

    /// `expire_ticket`: every ticket of `platform` (of every platform when `None`) pushed so far
    /// is expired; the next push brings a valid one.
    pub fn expire_tickets(&mut self, platform: Option<usize>) {
        for (i, list) in self.tickets.iter_mut().enumerate() {
            if platform.is_none_or(|p| p == i) {
                list.iter_mut().for_each(|t| t.expired = true);
            }
        }
    }

    /// Remembers a new pre-auth code of `platform`, valid for `ttl` from `now`.
    pub fn add_pre_auth(&mut self, platform: usize, code: String, now: i64, ttl: Duration) {
        prune(&mut self.pre_auth, now, |p| p.expires_ms);
        self.pre_auth.insert(
            code,
            PreAuth {
                platform,
                expires_ms: now.saturating_add(ms(ttl)),
                used: false,
            },
        );
    }

    /// Whether `code` is a pre-auth code of `platform` that can be used at `now`.
    pub fn check_pre_auth(
        &self,
        platform: usize,
        code: &str,
        now: i64,
    ) -> Result<(), PreAuthProblem> {
        match self.pre_auth.get(code) {
            Some(p) if p.platform != platform => Err(PreAuthProblem::Unknown),
            Some(p) if p.used => Err(PreAuthProblem::Used),
            Some(p) if p.expires_ms <= now => Err(PreAuthProblem::Expired),
            Some(_) => Ok(()),
            None => Err(PreAuthProblem::Unknown),
        }
    }

    /// An administrator authorised a platform for an Official Account with a pre-auth code: the
    /// code is used up, the account's earlier authorisation (and its refresh token) replaced, and
    /// the authorisation code is valid for `ttl` from `now`.
    pub fn authorise(
        &mut self,
        a: Authorisation<'_>,
        now: i64,
        ttl: Duration,
    ) -> Result<(), PreAuthProblem> {
        let Authorisation {
            platform,
            oa,
            pre_auth,
            granted,
            auth_code,
            refresh_token,
        } = a;
        self.check_pre_auth(platform, pre_auth, now)?;
        if let Some(p) = self.pre_auth.get_mut(pre_auth) {
            p.used = true;
        }
        if let Some(old) = self.grants.remove(&oa) {
            self.refresh.remove(&old.refresh_token);
        }
        self.refresh.insert(refresh_token.clone(), oa);
        self.grants.insert(
            oa,
            Grant {
                refresh_token,
                granted,
            },
        );
        prune(&mut self.auth_codes, now, |c| c.expires_ms);
        self.auth_codes.insert(
            auth_code,
            AuthCode {
                platform,
                oa,
                expires_ms: now.saturating_add(ms(ttl)),
                used: false,
            },
        );
        Ok(())
    }

    /// `api_query_auth`: the account an authorisation code of `platform` is for, using it up; or
    /// the errcode: 61009 unknown or used, 61010 expired.
    pub fn take_auth_code(&mut self, platform: usize, code: &str, now: i64) -> Result<usize, i64> {
        match self.auth_codes.get_mut(code) {
            Some(c) if c.platform != platform || c.used => Err(61009),
            Some(c) if c.expires_ms <= now => Err(61010),
            Some(c) => {
                c.used = true;
                Ok(c.oa)
            }
            None => Err(61009),
        }
    }

    /// The Official Account a refresh token works for now.
    pub fn refreshes(&self, refresh_token: &str) -> Option<usize> {
        self.refresh.get(refresh_token).copied()
    }

    /// The account's current authorisation.
    pub fn grant(&self, oa: usize) -> Option<&Grant> {
        self.grants.get(&oa)
    }

    /// The account withdraws its authorisation: its refresh token and pending authorisation
    /// codes stop working. Whether it had one.
    pub fn revoke(&mut self, oa: usize) -> bool {
        let Some(grant) = self.grants.remove(&oa) else {
            return false;
        };
        self.refresh.remove(&grant.refresh_token);
        self.auth_codes.retain(|_, c| c.oa != oa);
        true
    }
}

/// A random value after WeChat's own prefix (`ticket@@@`, `preauthcode@@@`, ...).
fn fresh(prefix: &str) -> String {
    format!("{prefix}{}", super::token_value(48))
}

/// A new ticket for `platform`, remembered as pushed now.
pub(super) fn new_ticket(s: &Sandbox, platform: usize) -> String {
    let value = fresh("ticket@@@");
    lock(&s.open).add_ticket(platform, value.clone(), now());
    value
}

/// Expires now the component tokens of `platform` (every platform's when `None`) and the
/// authorizer tokens of the Official Accounts authorised through it.
pub(super) fn expire_tokens(s: &Sandbox, platform: Option<usize>, now: i64) {
    let ours = |p: usize| platform.is_none_or(|x| x == p);
    lock(&s.tokens).expire_owned(now, |o| match o.channel {
        Channel::OpenPlatform => ours(o.account),
        Channel::Oa => s
            .accounts
            .oa
            .get(o.account)
            .and_then(|a| a.platform())
            .is_some_and(ours),
        _ => false,
    });
}

/// The Official Accounts the `revoke` rules name, each checked to be authorised now (through
/// the rule's platform, when it names one); the first that is not refuses the whole list.
pub(super) fn revocations(s: &Sandbox, rules: &[Rule]) -> Result<Vec<usize>, FaultError> {
    let mut out = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let Action::Revoke { app_id } = &rule.action else {
            continue;
        };
        let platform = rule
            .touchpoint
            .as_deref()
            .and_then(|t| s.accounts.platforms.iter().position(|p| p.id == t));
        let found = s.accounts.oa.iter().position(|a| {
            &a.app_id == app_id
                && a.platform()
                    .is_some_and(|p| platform.is_none_or(|x| x == p))
        });
        let Some(oa) = found else {
            return Err(FaultError::Rule {
                index,
                problem: format!(
                    "no Official Account with app id `{app_id}` is authorised through {} the sandbox serves",
                    rule.touchpoint
                        .as_deref()
                        .map_or("a platform".to_string(), |t| format!("the platform `{t}`"))
                ),
            });
        };
        if lock(&s.open).grant(oa).is_none() {
            return Err(FaultError::Rule {
                index,
                problem: format!(
                    "`{app_id}` ({}) has not authorised its platform, or was revoked already: nothing to revoke (authorise it on the authorisation page first)",
                    s.accounts.oa[oa].id
                ),
            });
        }
        out.push(oa);
    }
    Ok(out)
}

/// `revoke`: the account withdraws its authorisation; its authorizer tokens expire and its
/// platform is told with an `unauthorized` push.
pub(super) async fn revoke(s: &Shared, oa: usize, now: i64) {
    let Some(platform) = s.accounts.oa.get(oa).and_then(|a| a.platform()) else {
        return;
    };
    if !lock(&s.open).revoke(oa) {
        return;
    }
    lock(&s.tokens).expire_owned(now, |o| o.channel == Channel::Oa && o.account == oa);
    // Pushed before the fault API answers, so that whoever revoked sees the platform told.
    super::push::event_now(
        s,
        platform,
        Event::Unauthorized {
            authorizer_app_id: s.accounts.oa[oa].app_id.clone(),
            create_time: now / 1000,
        },
    )
    .await;
}

/// The body's keys whose values are secret: the log shows them replaced.
const SECRET_KEYS: [&str; 4] = [
    "component_appsecret",
    "component_verify_ticket",
    "authorizer_refresh_token",
    "authorization_code",
];

/// A JSON body as the log keeps it: the values of [`SECRET_KEYS`] replaced.
fn masked(body: &[u8]) -> Option<Box<RawValue>> {
    let mut doc = parse_json(body)?;
    for key in SECRET_KEYS {
        if let Some(v) = doc.get_mut(key) {
            *v = json!("<redacted>");
        }
    }
    RawValue::from_string(Value::Object(doc).to_string()).ok()
}

/// Reads a component call's body and starts its log entry, the secrets masked.
async fn start(
    s: &Sandbox,
    kind: Kind,
    endpoint: &str,
    body: Body,
) -> Result<(Entry, Bytes), Response> {
    let (mut entry, bytes) = receive(s, Channel::OpenPlatform, kind, endpoint, body).await?;
    if entry.body.is_some() {
        entry.body = masked(&bytes);
    }
    Ok((entry, bytes))
}

/// A string field of a body, when present and not empty.
fn field<'a>(doc: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    doc.get(key)
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
}

/// The platform a component token was issued to, or the errcode: 41001 missing, 40001 unknown
/// (or not a component token), 42001 expired.
fn platform_of(s: &Sandbox, q: Option<&str>, entry: &mut Entry) -> Result<usize, i64> {
    let q = query(q);
    let Some(token) = q
        .get("component_access_token")
        .or_else(|| q.get("access_token"))
        .filter(|t| !t.is_empty())
    else {
        return Err(41001);
    };
    match lock(&s.tokens).standing(token, now()) {
        Standing::Valid(o) if o.channel == Channel::OpenPlatform => {
            entry.touchpoint = s.name(Channel::OpenPlatform, o.account);
            Ok(o.account)
        }
        Standing::Expired(o) if o.channel == Channel::OpenPlatform => {
            entry.touchpoint = s.name(Channel::OpenPlatform, o.account);
            Err(42001)
        }
        _ => Err(40001),
    }
}

/// The checks every call with a component token makes, in order: the token, a JSON body, the
/// faults, and a `component_appid` (when given) that is the token's platform. The platform and
/// the body, or the answer.
async fn component_call(
    s: &Sandbox,
    q: Option<&str>,
    body: &[u8],
    entry: &mut Entry,
) -> Result<(usize, Map<String, Value>), Response> {
    let platform = platform_of(s, q, entry).map_err(|code| error(entry, code))?;
    let Some(doc) = parse_json(body) else {
        return Err(error(entry, 47001));
    };
    // `match.endpoint` "token" is the token endpoints (`api_authorizer_token` here).
    let endpoint = match entry.kind {
        Kind::Token => Endpoint::Token,
        _ => Endpoint::Send,
    };
    let verdict = s.faults(entry, endpoint, &[]).await;
    if let Some(r) = verdict.refuse {
        return Err(refuse(entry, r, 45009, error));
    }
    if field(&doc, "component_appid")
        .is_some_and(|a| a != s.accounts.platforms[platform].component_app_id)
    {
        return Err(error(entry, 61011));
    }
    Ok((platform, doc))
}

/// Issues an authorizer token for the Official Account `oa`: its value and lifetime in seconds.
fn authorizer_token_for(s: &Sandbox, oa: usize) -> (String, u64) {
    let owner = Owner {
        channel: Channel::Oa,
        account: oa,
        contact: false,
    };
    let (token, _) =
        lock(&s.tokens).issue_oa(owner, now(), s.wechat_ttl, || super::token_value(96));
    (token, s.wechat_ttl.as_secs())
}

/// `func_info` as WeChat writes it.
fn func_info(granted: &[u32]) -> Value {
    Value::Array(
        granted
            .iter()
            .map(|id| json!({ "funcscope_category": { "id": id } }))
            .collect(),
    )
}

/// Serves a component endpoint that takes a component token: reads the body, makes the checks
/// every such call makes ([`component_call`]), answers with `answer(sandbox, platform, body,
/// entry)` and logs the request.
macro_rules! component_endpoint {
    ($(#[$doc:meta])* $name:ident, $path:literal, $kind:expr, $answer:ident) => {
        $(#[$doc])*
        pub(super) async fn $name(
            State(s): State<Shared>,
            RawQuery(q): RawQuery,
            body: Body,
        ) -> Response {
            let (mut entry, body) = match start(&s, $kind, $path, body).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let answer = match component_call(&s, q.as_deref(), &body, &mut entry).await {
                Ok((platform, doc)) => $answer(&s, platform, &doc, &mut entry),
                Err(r) => r,
            };
            s.record(entry);
            answer
        }
    };
}

/// `POST /cgi-bin/component/api_component_token`.
pub(super) async fn component_token(State(s): State<Shared>, body: Body) -> Response {
    let endpoint = "/cgi-bin/component/api_component_token";
    let (mut entry, body) = match start(&s, Kind::Token, endpoint, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let answer = component_token_answer(&s, &body, &mut entry).await;
    s.record(entry);
    answer
}

component_endpoint!(
    /// `POST /cgi-bin/component/api_create_preauthcode`.
    create_preauthcode,
    "/cgi-bin/component/api_create_preauthcode",
    Kind::Query,
    preauthcode_answer
);
component_endpoint!(
    /// `POST /cgi-bin/component/api_query_auth`.
    query_auth,
    "/cgi-bin/component/api_query_auth",
    Kind::Query,
    query_auth_answer
);
component_endpoint!(
    /// `POST /cgi-bin/component/api_authorizer_token`.
    authorizer_token,
    "/cgi-bin/component/api_authorizer_token",
    Kind::Token,
    authorizer_token_answer
);
component_endpoint!(
    /// `POST /cgi-bin/component/api_get_authorizer_info`.
    get_authorizer_info,
    "/cgi-bin/component/api_get_authorizer_info",
    Kind::Query,
    authorizer_info_answer
);

async fn component_token_answer(s: &Sandbox, body: &[u8], entry: &mut Entry) -> Response {
    let doc = parse_json(body);
    let given = |k: &str| doc.as_ref().and_then(|d| field(d, k));
    let platform = given("component_appid").and_then(|id| {
        s.accounts
            .platforms
            .iter()
            .position(|p| p.component_app_id == id)
    });
    entry.touchpoint = platform.and_then(|i| s.name(Channel::OpenPlatform, i));
    let verdict = s.faults(entry, Endpoint::Token, &[]).await;
    if let Some(r) = verdict.refuse {
        return refuse(entry, r, 45009, error);
    }
    if doc.is_none() {
        return error(entry, 47001);
    }
    if given("component_appid").is_none() {
        return error(entry, 41002);
    }
    let Some(i) = platform else {
        return error(entry, 61011);
    };
    let Some(secret) = given("component_appsecret") else {
        return error(entry, 41004);
    };
    if !same_secret(secret, &s.accounts.platforms[i].secret) {
        return error(entry, 40125);
    }
    let standing = given("component_verify_ticket").map_or(TicketStanding::Unknown, |t| {
        lock(&s.open).ticket(i, t, now())
    });
    match standing {
        TicketStanding::Valid => {}
        TicketStanding::Expired => return error(entry, 61005),
        TicketStanding::Unknown => return error(entry, 61006),
    }
    let owner = Owner {
        channel: Channel::OpenPlatform,
        account: i,
        contact: false,
    };
    let (token, _) =
        lock(&s.tokens).issue_oa(owner, now(), s.wechat_ttl, || super::token_value(96));
    entry.answer.code = Some(0);
    super::json_answer(
        axum::http::StatusCode::OK,
        super::wechat::CONTENT_TYPE,
        &json!({ "component_access_token": token, "expires_in": s.wechat_ttl.as_secs() }),
    )
}

fn preauthcode_answer(
    s: &Sandbox,
    platform: usize,
    _body: &Map<String, Value>,
    entry: &mut Entry,
) -> Response {
    let code = fresh("preauthcode@@@");
    lock(&s.open).add_pre_auth(platform, code.clone(), now(), s.pre_auth_ttl);
    reply(
        entry,
        0,
        &json!({ "pre_auth_code": code, "expires_in": s.pre_auth_ttl.as_secs() }),
    )
}

fn query_auth_answer(
    s: &Sandbox,
    platform: usize,
    doc: &Map<String, Value>,
    entry: &mut Entry,
) -> Response {
    let Some(code) = field(doc, "authorization_code") else {
        return error(entry, 61009);
    };
    let taken = {
        let mut open = lock(&s.open);
        open.take_auth_code(platform, code, now())
            .and_then(|oa| open.grant(oa).cloned().map(|g| (oa, g)).ok_or(61009))
    };
    let (oa, grant) = match taken {
        Ok(r) => r,
        Err(code) => return error(entry, code),
    };
    let (token, expires_in) = authorizer_token_for(s, oa);
    reply(
        entry,
        0,
        &json!({ "authorization_info": {
            "authorizer_appid": s.accounts.oa[oa].app_id,
            "authorizer_access_token": token,
            "expires_in": expires_in,
            "authorizer_refresh_token": grant.refresh_token,
            "func_info": func_info(&grant.granted),
        }}),
    )
}

fn authorizer_token_answer(
    s: &Sandbox,
    platform: usize,
    doc: &Map<String, Value>,
    entry: &mut Entry,
) -> Response {
    let Some(refresh_token) = field(doc, "authorizer_refresh_token") else {
        return error(entry, 61023);
    };
    let oa = lock(&s.open).refreshes(refresh_token).filter(|&oa| {
        let a = &s.accounts.oa[oa];
        a.platform() == Some(platform) && field(doc, "authorizer_appid") == Some(&a.app_id)
    });
    let Some(oa) = oa else {
        return error(entry, 61023);
    };
    let (token, expires_in) = authorizer_token_for(s, oa);
    entry.answer.code = Some(0);
    // A token answer has no errcode, as `api_component_token`'s.
    super::json_answer(
        axum::http::StatusCode::OK,
        super::wechat::CONTENT_TYPE,
        &json!({
            "authorizer_access_token": token,
            "expires_in": expires_in,
            "authorizer_refresh_token": refresh_token,
        }),
    )
}

/// `gh_` and twelve hex digits derived from the app id: the account's original id.
fn user_name(app_id: &str) -> String {
    use sha1::Digest;
    let digest = hex::encode(sha1::Sha1::digest(app_id.as_bytes()));
    format!("gh_{}", &digest[..12])
}

fn authorizer_info_answer(
    s: &Sandbox,
    platform: usize,
    doc: &Map<String, Value>,
    entry: &mut Entry,
) -> Response {
    let asked = field(doc, "authorizer_appid");
    let found = s.accounts.authorisable(platform).find_map(|(i, a)| {
        (Some(a.app_id.as_str()) == asked)
            .then(|| lock(&s.open).grant(i).cloned().map(|g| (a, g)))
            .flatten()
    });
    let Some((account, grant)) = found else {
        return error(entry, 61003);
    };
    reply(
        entry,
        0,
        &json!({
            "authorizer_info": {
                "nick_name": account.name,
                "head_img": "",
                "service_type_info": { "id": 2 },
                "verify_type_info": { "id": 0 },
                "user_name": user_name(&account.app_id),
                "principal_name": "touchctl sandbox",
                "alias": "",
                "business_info": {
                    "open_store": 0, "open_scan": 0, "open_pay": 0, "open_card": 0, "open_shake": 0
                },
                "qrcode_url": "",
                "account_status": 1,
            },
            "authorization_info": {
                "authorizer_appid": account.app_id,
                "authorizer_refresh_token": grant.refresh_token,
                "func_info": func_info(&grant.granted),
            },
        }),
    )
}

/// Whether the Official Account `oa` may use an API that needs permission set `id`: always in
/// direct mode (the account acts for itself), else when its authorisation granted it.
pub(super) fn may(s: &Sandbox, oa: usize, id: u32) -> bool {
    match s.accounts.oa.get(oa).and_then(|a| a.platform()) {
        None => true,
        Some(_) => lock(&s.open)
            .grant(oa)
            .is_some_and(|g| g.granted.contains(&id)),
    }
}

/// Whether `oa` may send template messages (permission set 7).
pub(super) fn may_send_templates(s: &Sandbox, oa: usize) -> bool {
    may(s, oa, TEMPLATE_MESSAGES)
}

/// Whether `oa` may list its linked mini programs (permission set 33).
pub(super) fn may_list_links(s: &Sandbox, oa: usize) -> bool {
    may(s, oa, MINI_PROGRAM_LINKS)
}

/// The mini programs of an account as `wxamplinkget` lists them.
pub(super) fn linked_items(app_ids: &[String]) -> Value {
    Value::Array(
        app_ids
            .iter()
            .map(|app_id| {
                json!({
                    "status": 1,
                    "username": user_name(app_id),
                    "appid": app_id,
                    "source": "SOURCE_NORMAL",
                    "nickname": format!("小程序 {app_id}"),
                    "selected": 1,
                    "nearby_display_status": 0,
                    "released": 1,
                    "headimg_url": "",
                    "func_infos": [
                        { "status": 0, "id": 1, "name": "微信认证" },
                        { "status": 0, "id": 2, "name": "微信支付" }
                    ],
                    "email": "",
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: i64 = 3_600_000;

    /// An authorisation of platform 0.
    fn grant<'a>(
        oa: usize,
        pre_auth: &'a str,
        granted: &[u32],
        code: &str,
        refresh: &str,
    ) -> Authorisation<'a> {
        Authorisation {
            platform: 0,
            oa,
            pre_auth,
            granted: granted.to_vec(),
            auth_code: code.into(),
            refresh_token: refresh.into(),
        }
    }

    #[test]
    fn tickets_are_valid_twelve_hours_unless_expired_and_the_last_few_are_kept() {
        let mut st = Memory::new(2);
        st.add_ticket(0, "t1".into(), 0);
        st.add_ticket(0, "t2".into(), HOUR_MS);
        assert_eq!(st.ticket(0, "t1", 12 * HOUR_MS - 1), TicketStanding::Valid);
        assert_eq!(st.ticket(0, "t1", 12 * HOUR_MS), TicketStanding::Expired);
        assert_eq!(st.ticket(0, "t2", 12 * HOUR_MS), TicketStanding::Valid);
        assert_eq!(
            st.ticket(1, "t2", 0),
            TicketStanding::Unknown,
            "another platform's"
        );
        assert_eq!(st.ticket(0, "never", 0), TicketStanding::Unknown);
        st.expire_tickets(Some(0));
        assert_eq!(st.ticket(0, "t2", HOUR_MS), TicketStanding::Expired);
        st.add_ticket(0, "t3".into(), HOUR_MS);
        assert_eq!(
            st.ticket(0, "t3", HOUR_MS),
            TicketStanding::Valid,
            "the next push is valid"
        );
        for i in 0..KEPT_TICKETS {
            st.add_ticket(1, format!("n{i}"), 0);
        }
        st.add_ticket(1, "last".into(), 0);
        assert_eq!(
            st.ticket(1, "n0", 0),
            TicketStanding::Unknown,
            "forgotten past the cap"
        );
        assert_eq!(st.ticket(1, "n1", 0), TicketStanding::Valid);
    }

    #[test]
    fn a_pre_auth_code_is_used_once_and_expires() {
        let mut st = Memory::new(2);
        let ttl = PRE_AUTH_TTL;
        st.add_pre_auth(0, "p1".into(), 0, ttl);
        assert_eq!(st.check_pre_auth(1, "p1", 0), Err(PreAuthProblem::Unknown));
        assert_eq!(
            st.check_pre_auth(0, "p1", 1_800_000),
            Err(PreAuthProblem::Expired)
        );
        let auth = |st: &mut Memory, code: &str, refresh: &str| {
            st.authorise(grant(3, "p1", &[1, 7], code, refresh), 10, AUTH_CODE_TTL)
        };
        assert_eq!(auth(&mut st, "a1", "r1"), Ok(()));
        assert_eq!(auth(&mut st, "a2", "r2"), Err(PreAuthProblem::Used));
        assert_eq!(st.refreshes("r1"), Some(3));
        assert_eq!(
            st.refreshes("r2"),
            None,
            "nothing changed by the refused use"
        );
    }

    #[test]
    fn an_auth_code_is_single_use_and_re_authorising_replaces_the_refresh_token() {
        let mut st = Memory::new(1);
        st.add_pre_auth(0, "p1".into(), 0, PRE_AUTH_TTL);
        st.add_pre_auth(0, "p2".into(), 0, PRE_AUTH_TTL);
        st.authorise(grant(0, "p1", &[1], "a1", "r1"), 0, AUTH_CODE_TTL)
            .unwrap();
        assert_eq!(st.take_auth_code(0, "a1", 599_999), Ok(0));
        assert_eq!(st.take_auth_code(0, "a1", 599_999), Err(61009), "used");
        st.authorise(grant(0, "p2", &[1, 2], "a2", "r2"), 0, AUTH_CODE_TTL)
            .unwrap();
        assert_eq!(st.take_auth_code(0, "a2", 600_000), Err(61010), "expired");
        assert_eq!(st.take_auth_code(0, "zz", 0), Err(61009), "unknown");
        assert_eq!(
            st.refreshes("r1"),
            None,
            "the old refresh token is replaced"
        );
        assert_eq!(st.refreshes("r2"), Some(0));
        assert_eq!(st.grant(0).map(|g| g.granted.clone()), Some(vec![1, 2]));
    }

    #[test]
    fn revoking_stops_the_refresh_token_and_pending_codes() {
        let mut st = Memory::new(1);
        st.add_pre_auth(0, "p1".into(), 0, PRE_AUTH_TTL);
        st.authorise(grant(5, "p1", &[1], "a1", "r1"), 0, AUTH_CODE_TTL)
            .unwrap();
        assert!(st.revoke(5));
        assert!(!st.revoke(5), "nothing left to revoke");
        assert_eq!(st.refreshes("r1"), None);
        assert_eq!(st.take_auth_code(0, "a1", 0), Err(61009));
        assert_eq!(st.grant(5), None);
    }

    #[test]
    fn the_log_masks_secret_values() {
        let body = br#"{"component_appid":"wx1","component_appsecret":"s3cret","component_verify_ticket":"ticket@@@x","authorizer_refresh_token":"r","authorization_code":"c"}"#;
        let shown = masked(body).unwrap().get().to_string();
        for secret in ["s3cret", "ticket@@@x", "\"r\"", "\"c\""] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("\"component_appid\":\"wx1\""), "{shown}");
        assert!(masked(b"not json").is_none());
    }

    #[test]
    fn permission_labels_follow_the_official_table() {
        assert_eq!(label(7), Some("群发与通知"));
        assert_eq!(label(33), Some("小程序关联管理"));
        assert_eq!(label(14), None);
        for id in DEFAULT_CATEGORIES {
            assert!(label(id).is_some(), "{id}");
        }
    }
}
