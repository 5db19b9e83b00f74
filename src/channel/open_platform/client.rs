//! The component API client of one third-party platform (CHANNELS.md §2.2–2.7): the component
//! token, pre-auth codes and the authorisation page URLs, exchanging an authorisation code,
//! reading an authorizer's permissions, and authorizer tokens from a refresh token.
//!
//! # Tokens and the ticket
//! The component token (`api_component_token`) needs the latest `component_verify_ticket`, which
//! WeChat pushes every 10 minutes to the platform's event URL; the daemon keeps it in the registry
//! ([`TicketStore`]). The token is cached in [`Shared::tokens`], keyed by the API base, the
//! component app id and its secret, one fetch at a time, and replaced shortly before it expires.
//! When WeChat refuses the ticket (61005 expired, 61006 invalid) that ticket is not sent again:
//! every call fails at once with [`PlatformError::NoTicket`] until a new one is stored
//! ([`Platform::store_ticket`]). A component API that refuses the cached component token (40001,
//! 40014, 42001) is sent once more with a new one.
//!
//! Component APIs carry the token as `?component_access_token=` (the name wechatpy and the older
//! docs use; the newer docs write `access_token`, which WeChat also accepts).
//!
//! # Secrets
//! No token, ticket, pre-auth code, auth code or refresh token is ever in an error, a `Debug` or a
//! log: [`Authorization`]'s `Debug` hides them, and errors carry WeChat's code and message only.
//! Answers are read up to 64 KiB; a request's URL (which carries the token) is never printed.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::crypt::MsgCrypt;
use crate::channel::token::{CredentialKey, Token};
use crate::channel::wechat::{self, Failure, errcode, errmsg_of, read_answer};
use crate::channel::{Shared, Unavailable};
use crate::model::{Secret, SecretError, SecretPolicy, SecretRef, WechatOpenPlatformSpec};

/// Where the PC authorisation page is served.
pub const DEFAULT_MP_BASE: &str = "https://mp.weixin.qq.com";

/// Where the mobile authorisation page is served.
pub const DEFAULT_OPEN_BASE: &str = "https://open.weixin.qq.com";

/// The permission sets the authorisation pages ask for: the eight the console needs.
pub const CATEGORY_ID_LIST: &str = "1|2|3|4|7|11|15|24";

/// A component token's lifetime when the answer gives none, and the longest believed.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(7200);
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// A pre-auth code's lifetime when the answer gives none (the docs say 1800 s).
const DEFAULT_PRE_AUTH: Duration = Duration::from_secs(1800);

/// The registry keeps the latest ticket per platform id.
pub trait TicketStore: Send + Sync {
    /// The latest ticket of `platform_id`, if one was received.
    fn ticket(&self, platform_id: &str) -> Result<Option<String>, String>;
    /// Keeps `ticket` as the latest of `platform_id`.
    fn store(&self, platform_id: &str, ticket: &str) -> Result<(), String>;
}

/// The registry as the store of tickets (the registry knows nothing of channels).
impl TicketStore for crate::registry::Tickets {
    fn ticket(&self, platform_id: &str) -> Result<Option<String>, String> {
        self.0
            .platform_ticket(platform_id)
            .map_err(|e| e.to_string())
    }

    fn store(&self, platform_id: &str, ticket: &str) -> Result<(), String> {
        self.0
            .set_platform_ticket(platform_id, ticket)
            .map_err(|e| e.to_string())
    }
}

/// Why a component API call failed. Display says what to do, WeChat's code first; no variant
/// holds a token, ticket, code or secret.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// No usable verify ticket: none received yet, or WeChat refused the latest (61005, 61006).
    #[error(
        "{}no valid component_verify_ticket for platform `{platform}` yet: WeChat pushes one every 10 minutes to /wechat/platforms/{platform}/events; check that this URL (on the daemon's public address) is the platform's 授权事件接收URL (开放平台 → 第三方平台 → 开发资料) and that the daemon is reachable from WeChat, then wait for the next push",
        said.as_ref().map(|(c, m)| format!("{c} {m}: ")).unwrap_or_default()
    )]
    NoTicket {
        /// The platform id.
        platform: String,
        /// WeChat's code and message, when it refused a ticket.
        said: Option<(i64, String)>,
    },
    /// WeChat refused the platform's configuration: hold, do not retry.
    #[error("{code} {errmsg}: {fix}")]
    Config {
        /// WeChat's code.
        code: i64,
        /// WeChat's message.
        errmsg: String,
        /// What to change.
        fix: &'static str,
    },
    /// The refresh token no longer works (61023): the authorisation was revoked or replaced.
    #[error(
        "61023 {errmsg}: the authorisation was revoked or the refresh token is invalid; re-authorise the account with `touchctl auth wechat`"
    )]
    Revoked {
        /// WeChat's message.
        errmsg: String,
    },
    /// Another errcode.
    #[error("{code} {errmsg}: {}", code_hint(*code))]
    Code {
        /// WeChat's code.
        code: i64,
        /// WeChat's message.
        errmsg: String,
    },
    /// No usable answer (network, HTTP status, not WeChat's JSON, too long).
    #[error("{0}; try again later")]
    Transport(String),
    /// The answer lacks what it must carry.
    #[error(
        "WeChat's answer to {api} has no {what}: not the answer the API documents; try again later"
    )]
    Answer {
        /// The API.
        api: &'static str,
        /// What is missing.
        what: &'static str,
    },
    /// The platform's `api_base` is refused by the network guard.
    #[error("not sent: {0}")]
    Refused(String),
    /// The registry could not keep or give the ticket.
    #[error("the registry cannot keep the verify ticket: {0}")]
    Store(String),
    /// The refresh token could not be written.
    #[error("cannot write the refresh token to {}: {source}; make the folder writable by touchctl's user, then bind again", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The reference is not where touchctl may write a refresh token.
    #[error("cannot write the refresh token: {0}")]
    Place(#[from] SecretError),
    /// `authorizer_refresh_token` is not a file reference.
    #[error(
        "`auth.authorizer_refresh_token` is {0}, but touchctl writes the refresh token itself: make it `{{ file = \"...\" }}`"
    )]
    NotAFile(String),
    /// The value to write is not one line of text.
    #[error("WeChat's refresh token is not one line of text, so it cannot be kept in a file")]
    BadToken,
    /// The process is shutting down (the shared token cache is gone).
    #[error("touchctl is shutting down")]
    Gone,
}

impl PlatformError {
    /// Whether the platform's configuration is wrong (secret, app id, IP whitelist): the
    /// touchpoints that depend on it are held, not retried.
    pub fn is_config(&self) -> bool {
        matches!(self, PlatformError::Config { .. })
    }

    /// WeChat's code, when WeChat answered one.
    pub fn code(&self) -> Option<i64> {
        match self {
            PlatformError::NoTicket { said, .. } => said.as_ref().map(|(c, _)| *c),
            PlatformError::Config { code, .. } | PlatformError::Code { code, .. } => Some(*code),
            PlatformError::Revoked { .. } => Some(61023),
            _ => None,
        }
    }

    fn from_code(platform: &str, code: i64, errmsg: String) -> Self {
        let fix = match code {
            61005 | 61006 => {
                return PlatformError::NoTicket {
                    platform: platform.to_string(),
                    said: Some((code, errmsg)),
                };
            }
            61023 => return PlatformError::Revoked { errmsg },
            61004 => {
                "this machine's IP address is not in the platform's whitelist: add it (开放平台 → 第三方平台 → 开发资料 → 授权后实现业务 → 白名单IP地址列表), then resume"
            }
            40125 | 41004 => {
                "WeChat refused the platform's AppSecret: put the current one (开放平台 → 第三方平台 → 详情) where `component_secret` points, then apply"
            }
            61011 => {
                "WeChat does not know this platform: check `component_app_id` against 开放平台 → 第三方平台 → 详情, then apply"
            }
            _ => return PlatformError::Code { code, errmsg },
        };
        PlatformError::Config { code, errmsg, fix }
    }
}

/// What to do about an errcode that is neither a ticket nor a configuration problem.
fn code_hint(code: i64) -> &'static str {
    match code {
        61009 | 61010 => {
            "the authorisation code is invalid, used or expired (it lasts 10 minutes): start the binding again"
        }
        61003 => {
            "the account has not authorised this platform: bind it with `touchctl auth wechat`"
        }
        45009 => {
            "the platform's daily quota of this API is used up: it resets at 00:00 China Standard Time"
        }
        45011 => "the API's rate limit was hit: try again in a minute",
        -1 => "WeChat is busy: try again later",
        _ => "WeChat refused the request; try again later",
    }
}

/// A request without a usable answer (all that `read_answer` fails with).
fn transport(f: Failure) -> PlatformError {
    match f {
        Failure::Transport { error, .. } => PlatformError::Transport(error),
        Failure::Code { code, errmsg, .. } => PlatformError::Code { code, errmsg },
        Failure::Said(signal) => PlatformError::Transport(signal.said()),
    }
}

/// What `api_query_auth` answered: the account that authorised the platform and its tokens.
pub struct Authorization {
    /// The authorizer's app id.
    pub app_id: String,
    /// The refresh token, to keep in the touchpoint's file.
    pub refresh_token: String,
    /// An authorizer access token.
    pub access_token: String,
    /// How long `access_token` lasts.
    pub expires_in: Duration,
    /// The permission set ids (`func_info`) granted.
    pub granted: Vec<u32>,
}

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorization")
            .field("app_id", &self.app_id)
            .field("refresh_token", &"(sensitive)")
            .field("access_token", &"(sensitive)")
            .field("expires_in", &self.expires_in)
            .field("granted", &self.granted)
            .finish()
    }
}

/// What `api_get_authorizer_info` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizerInfo {
    /// The authorizer's app id.
    pub app_id: String,
    /// The account's name.
    pub nick_name: Option<String>,
    /// The permission set ids granted to this platform.
    pub granted: Vec<u32>,
}

/// What `api_authorizer_token` answered.
#[derive(Debug)]
pub struct AuthorizerToken {
    /// The authorizer access token.
    pub access_token: Secret,
    /// How long it lasts.
    pub expires_in: Duration,
    /// The refresh token WeChat returned (keep it: it may differ from the one sent).
    pub refresh_token: Option<Secret>,
}

/// One live `wechat_open_platform`, its secrets resolved.
pub struct Platform {
    id: String,
    component_app_id: String,
    secret: Secret,
    crypt: MsgCrypt,
    api_base: String,
    mp_base: String,
    open_base: String,
    key: CredentialKey,
    tickets: Arc<dyn TicketStore>,
    /// Weak: `shared` holds this platform in [`Shared::platforms`].
    shared: Weak<Shared>,
    client: reqwest::Client,
    allow_private: bool,
    /// The SHA-256 of the ticket WeChat refused, with what it said: not sent again.
    refused_ticket: Mutex<Option<([u8; 32], i64, String)>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("id", &self.id)
            .field("component_app_id", &self.component_app_id)
            .field("api_base", &self.api_base)
            .finish_non_exhaustive()
    }
}

impl Platform {
    /// Resolves the platform's secrets (file references relative to `base`, as `policy` allows)
    /// and builds its message crypto. Requests go through a client whose resolver refuses
    /// non-public addresses; [`Platform::with_network`] sets another.
    pub fn open(
        id: &str,
        spec: &WechatOpenPlatformSpec,
        base: &Path,
        policy: &SecretPolicy,
        tickets: Arc<dyn TicketStore>,
        shared: &Arc<Shared>,
    ) -> Result<Platform, Unavailable> {
        let read = |field: &str, r: &SecretRef| {
            r.resolve(base, policy)
                .map_err(|e| Unavailable(format!("cannot read `{field}` {r}: {e}")))
        };
        let secret = read("component_secret", &spec.component_secret)?;
        let token = read("token", &spec.token)?;
        let aes_key = read("encoding_aes_key", &spec.encoding_aes_key)?;
        let crypt = MsgCrypt::new(token.expose(), aes_key.expose(), &spec.component_app_id)
            .map_err(|e| Unavailable(format!("platform `{id}`: {e}")))?;
        let api_base = spec
            .api_base
            .as_deref()
            .unwrap_or(wechat::DEFAULT_API_BASE)
            .trim_end_matches('/')
            .to_string();
        url::Url::parse(&api_base).map_err(|e| {
            Unavailable(format!(
                "`api_base` {api_base:?} of platform `{id}` is not a valid URL ({e}): write it as https://host"
            ))
        })?;
        let (mp_base, open_base) = match &spec.api_base {
            Some(_) => (api_base.clone(), api_base.clone()),
            None => (DEFAULT_MP_BASE.to_string(), DEFAULT_OPEN_BASE.to_string()),
        };
        let client = crate::channel::net_guard::client_with(false, 2)
            .map_err(|e| Unavailable(format!("cannot start an HTTP client: {e}")))?;
        let key = CredentialKey::of(&[
            b"wechat_open_platform",
            api_base.as_bytes(),
            spec.component_app_id.as_bytes(),
            secret.expose().as_bytes(),
        ]);
        Ok(Platform {
            id: id.to_string(),
            component_app_id: spec.component_app_id.clone(),
            secret,
            crypt,
            api_base,
            mp_base,
            open_base,
            key,
            tickets,
            shared: Arc::downgrade(shared),
            client,
            allow_private: false,
            refused_ticket: Mutex::new(None),
        })
    }

    /// Sends through `client`; `allow_private` lets `api_base` be a loopback or private address
    /// (the daemon's `--allow-private-network`).
    pub fn with_network(mut self, client: reqwest::Client, allow_private: bool) -> Self {
        self.client = client;
        self.allow_private = allow_private;
        self
    }

    /// The platform file's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The component app id.
    pub fn component_app_id(&self) -> &str {
        &self.component_app_id
    }

    /// The base URL of the component APIs.
    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    /// The crypto of the events WeChat pushes to the platform.
    pub fn crypt(&self) -> &MsgCrypt {
        &self.crypt
    }

    /// Keeps a ticket WeChat pushed; a ticket refused before is sent again no more.
    pub fn store_ticket(&self, ticket: &str) -> Result<(), PlatformError> {
        self.tickets
            .store(&self.id, ticket)
            .map_err(PlatformError::Store)?;
        *self
            .refused_ticket
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// The component token: cached, or fetched with the latest ticket (one fetch at a time).
    pub async fn component_token(&self) -> Result<String, PlatformError> {
        Ok(self.cached_token().await?.value.expose().to_string())
    }

    async fn cached_token(&self) -> Result<Arc<Token>, PlatformError> {
        let shared = self.shared.upgrade().ok_or(PlatformError::Gone)?;
        shared
            .tokens
            .get(self.key, || self.fetch_component_token())
            .await
    }

    /// `api_component_token`.
    async fn fetch_component_token(&self) -> Result<(Secret, Duration), PlatformError> {
        let no_ticket = |said| PlatformError::NoTicket {
            platform: self.id.clone(),
            said,
        };
        let ticket = self
            .tickets
            .ticket(&self.id)
            .map_err(PlatformError::Store)?
            .ok_or_else(|| no_ticket(None))?;
        let digest: [u8; 32] = Sha256::digest(ticket.as_bytes()).into();
        if let Some((refused, code, errmsg)) = self
            .refused_ticket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && *refused == digest
        {
            return Err(no_ticket(Some((*code, errmsg.clone()))));
        }
        let body = json!({
            "component_appid": self.component_app_id,
            "component_appsecret": self.secret.expose(),
            "component_verify_ticket": ticket,
        });
        let url = self.url("/cgi-bin/component/api_component_token")?;
        let answer = self.post(url, &body).await?;
        if let Some(token) = text(&answer, "component_access_token") {
            return Ok((Secret::new(token), lifetime(&answer, DEFAULT_LIFETIME)));
        }
        match errcode(&answer) {
            Some(code) if code != 0 => {
                if matches!(code, 61005 | 61006) {
                    *self
                        .refused_ticket
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) =
                        Some((digest, code, errmsg_of(&answer)));
                }
                Err(PlatformError::from_code(&self.id, code, errmsg_of(&answer)))
            }
            _ => Err(PlatformError::Answer {
                api: "api_component_token",
                what: "component_access_token",
            }),
        }
    }

    /// `api_create_preauthcode`: a pre-auth code (single use) and how long it lasts.
    pub async fn pre_auth_code(&self) -> Result<(String, Duration), PlatformError> {
        let answer = self
            .component_api(
                "api_create_preauthcode",
                json!({"component_appid": self.component_app_id}),
            )
            .await?;
        let code = text(&answer, "pre_auth_code").ok_or(PlatformError::Answer {
            api: "api_create_preauthcode",
            what: "pre_auth_code",
        })?;
        Ok((code.to_string(), lifetime(&answer, DEFAULT_PRE_AUTH)))
    }

    /// The PC authorisation page (the admin scans a QR code) for the account `app_id` alone.
    pub fn pc_url(&self, pre_auth_code: &str, redirect_uri: &str, app_id: &str) -> String {
        let mut url = format!("{}/cgi-bin/componentloginpage?", self.mp_base);
        self.auth_query(&mut url, &[], pre_auth_code, redirect_uri, app_id);
        url
    }

    /// The mobile authorisation page (opened inside WeChat) for the account `app_id` alone.
    pub fn mobile_url(&self, pre_auth_code: &str, redirect_uri: &str, app_id: &str) -> String {
        let mut url = format!("{}/wxaopen/safe/bindcomponent?", self.open_base);
        self.auth_query(
            &mut url,
            &[("action", "bindcomponent"), ("no_scan", "1")],
            pre_auth_code,
            redirect_uri,
            app_id,
        );
        url.push_str("#wechat_redirect");
        url
    }

    /// Appends the authorisation page's query, every value percent-encoded.
    fn auth_query(
        &self,
        url: &mut String,
        first: &[(&str, &str)],
        pre_auth_code: &str,
        redirect_uri: &str,
        app_id: &str,
    ) {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(first.iter().copied());
        query.extend_pairs([
            ("component_appid", self.component_app_id.as_str()),
            ("pre_auth_code", pre_auth_code),
            ("redirect_uri", redirect_uri),
            ("auth_type", "1"),
            ("biz_appid", app_id),
            ("category_id_list", CATEGORY_ID_LIST),
        ]);
        url.push_str(&query.finish());
    }

    /// `api_query_auth`: exchanges the code the admin's browser brought back.
    pub async fn query_auth(&self, auth_code: &str) -> Result<Authorization, PlatformError> {
        const API: &str = "api_query_auth";
        let answer = self
            .component_api(
                API,
                json!({"component_appid": self.component_app_id, "authorization_code": auth_code}),
            )
            .await?;
        let info = answer
            .get("authorization_info")
            .and_then(Value::as_object)
            .ok_or(PlatformError::Answer {
                api: API,
                what: "authorization_info",
            })?;
        let field = |name: &'static str| {
            text(info, name)
                .map(str::to_string)
                .ok_or(PlatformError::Answer {
                    api: API,
                    what: name,
                })
        };
        Ok(Authorization {
            app_id: field("authorizer_appid")?,
            refresh_token: field("authorizer_refresh_token")?,
            access_token: field("authorizer_access_token")?,
            expires_in: lifetime(info, DEFAULT_LIFETIME),
            granted: func_info(info),
        })
    }

    /// `api_get_authorizer_info`: the account's name and the permissions it granted.
    pub async fn authorizer_info(&self, app_id: &str) -> Result<AuthorizerInfo, PlatformError> {
        const API: &str = "api_get_authorizer_info";
        let answer = self
            .component_api(
                API,
                json!({"component_appid": self.component_app_id, "authorizer_appid": app_id}),
            )
            .await?;
        let authorization = answer
            .get("authorization_info")
            .and_then(Value::as_object)
            .ok_or(PlatformError::Answer {
                api: API,
                what: "authorization_info",
            })?;
        let nick_name = answer
            .get("authorizer_info")
            .and_then(Value::as_object)
            .and_then(|i| text(i, "nick_name"))
            .map(|n| crate::term::escape(n).into_owned());
        Ok(AuthorizerInfo {
            app_id: text(authorization, "authorizer_appid")
                .unwrap_or(app_id)
                .to_string(),
            nick_name,
            granted: func_info(authorization),
        })
    }

    /// `api_authorizer_token`: a new authorizer access token from `refresh_token`.
    pub async fn authorizer_token(
        &self,
        app_id: &str,
        refresh_token: &Secret,
    ) -> Result<AuthorizerToken, PlatformError> {
        const API: &str = "api_authorizer_token";
        let answer = self
            .component_api(
                API,
                json!({
                    "component_appid": self.component_app_id,
                    "authorizer_appid": app_id,
                    "authorizer_refresh_token": refresh_token.expose(),
                }),
            )
            .await?;
        let token = text(&answer, "authorizer_access_token").ok_or(PlatformError::Answer {
            api: API,
            what: "authorizer_access_token",
        })?;
        Ok(AuthorizerToken {
            access_token: Secret::new(token),
            expires_in: lifetime(&answer, DEFAULT_LIFETIME),
            refresh_token: text(&answer, "authorizer_refresh_token").map(Secret::new),
        })
    }

    /// Calls the component API `api` with the component token; a refused token is replaced and
    /// the call sent once more.
    async fn component_api(
        &self,
        api: &'static str,
        body: Value,
    ) -> Result<Map<String, Value>, PlatformError> {
        let mut retried = false;
        loop {
            let token = self.cached_token().await?;
            let mut url = self.url(&format!("/cgi-bin/component/{api}"))?;
            url.query_pairs_mut()
                .append_pair("component_access_token", token.value.expose());
            let answer = self.post(url, &body).await?;
            match errcode(&answer) {
                None | Some(0) => return Ok(answer),
                Some(40001 | 40014 | 42001) if !retried => {
                    retried = true;
                    if let Some(shared) = self.shared.upgrade() {
                        shared.tokens.invalidate(self.key, &token).await;
                    }
                }
                Some(code) => {
                    return Err(PlatformError::from_code(&self.id, code, errmsg_of(&answer)));
                }
            }
        }
    }

    fn url(&self, path: &str) -> Result<url::Url, PlatformError> {
        url::Url::parse(&format!("{}{path}", self.api_base))
            .map_err(|e| PlatformError::Refused(format!("`api_base` is not a valid URL ({e})")))
    }

    /// POSTs `body` as JSON; the answer's JSON object, read up to its bound.
    async fn post(&self, url: url::Url, body: &Value) -> Result<Map<String, Value>, PlatformError> {
        if !self.allow_private {
            crate::channel::net_guard::check_url(&self.api_base)
                .await
                .map_err(|e| PlatformError::Refused(e.to_string()))?;
        }
        let response = self
            .client
            .post(url)
            .timeout(wechat::TIMEOUT)
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_string())
            .send()
            .await;
        read_answer(response)
            .await
            .map(|(_, answer)| answer)
            .map_err(transport)
    }
}

/// A non-empty string field.
fn text<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    map.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// `expires_in`, bounded.
fn lifetime(map: &Map<String, Value>, default: Duration) -> Duration {
    map.get("expires_in")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        .map_or(default, Duration::from_secs)
        .min(MAX_LIFETIME)
}

/// The permission set ids of `func_info` (`[{"funcscope_category": {"id": 1}}, ...]`), sorted,
/// each once.
fn func_info(info: &Map<String, Value>) -> Vec<u32> {
    let mut ids: Vec<u32> = info
        .get("func_info")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| f.get("funcscope_category")?.get("id")?.as_u64())
        .filter_map(|id| u32::try_from(id).ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The live platforms, by id: whoever builds channels puts them here before opening the Official
/// Accounts that name them.
#[derive(Default)]
pub struct Platforms {
    by_id: RwLock<HashMap<String, Arc<Platform>>>,
}

impl Platforms {
    /// Adds `platform`, or replaces the one with its id.
    pub fn set(&self, platform: Arc<Platform>) {
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(platform.id().to_string(), platform);
    }

    /// The platform `id`, if live.
    pub fn get(&self, id: &str) -> Option<Arc<Platform>> {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Keeps only the platforms whose id is in `ids`.
    pub fn retain<I, S>(&self, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keep: std::collections::HashSet<String> =
            ids.into_iter().map(|s| s.as_ref().to_string()).collect();
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| keep.contains(id));
    }
}

/// Writes a refresh token to the file `r` names (relative to `base`, confined as `policy` allows
/// reading it), atomically (temp file in the same folder + rename) with mode 0600. A folder that
/// does not exist yet is created (mode 0700).
pub fn write_refresh_token(
    r: &SecretRef,
    base: &Path,
    policy: &SecretPolicy,
    token: &str,
) -> Result<PathBuf, PlatformError> {
    let SecretRef::File { file } = r else {
        return Err(PlatformError::NotAFile(r.to_string()));
    };
    if token.is_empty() || token.chars().any(char::is_control) {
        return Err(PlatformError::BadToken);
    }
    let path = base.join(file);
    let target = policy.place_for_writing(&path)?;
    let write = |source| PlatformError::Write {
        path: path.clone(),
        source,
    };
    let folder = target.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
        .map_err(write)?;
    // NamedTempFile is created with mode 0600, in the target's folder, so the rename is atomic.
    let mut temp = tempfile::Builder::new()
        .prefix(".touchctl-refresh-")
        .tempfile_in(folder)
        .map_err(write)?;
    use std::io::Write as _;
    temp.write_all(token.as_bytes())
        .and_then(|()| temp.write_all(b"\n"))
        .and_then(|()| temp.as_file().sync_all())
        .map_err(write)?;
    temp.persist(&target).map_err(|e| write(e.error))?;
    // The rename is durable once the folder is.
    if let Ok(dir) = std::fs::File::open(folder) {
        let _ = dir.sync_all();
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::super::stub::{COMPONENT_SECRET, Stub, fixture};
    use super::*;

    #[tokio::test]
    async fn the_component_token_is_fetched_with_the_latest_ticket_once_and_cached() {
        let stub = Stub::default();
        let f = fixture(&stub.serve().await);
        assert_eq!(f.platform.component_token().await.unwrap(), "ctok0");
        assert_eq!(f.platform.component_token().await.unwrap(), "ctok0");
        let calls = stub.calls_to("/cgi-bin/component/api_component_token");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].1,
            json!({
                "component_appid": "wx5f4e3d2c1b0a9f8e",
                "component_appsecret": COMPONENT_SECRET,
                "component_verify_ticket": "ticket@@@1",
            })
        );
        assert_eq!(f.shared.tokens.fetches(), 1);
    }

    #[tokio::test]
    async fn without_a_ticket_the_error_says_where_wechat_pushes_it_and_nothing_is_sent() {
        let stub = Stub::default();
        let f = fixture(&stub.serve().await);
        f.tickets.0.lock().unwrap().clear();
        let e = f.platform.component_token().await.unwrap_err();
        assert!(
            matches!(e, PlatformError::NoTicket { said: None, .. }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("no valid component_verify_ticket for platform `open` yet"),
            "{text}"
        );
        assert!(text.contains("/wechat/platforms/open/events"), "{text}");
        assert!(text.contains("授权事件接收URL"), "{text}");
        assert!(!e.is_config());
        assert!(stub.with(|a| a.calls.is_empty()));
    }

    #[tokio::test]
    async fn a_refused_ticket_is_not_sent_again_until_a_new_one_is_stored() {
        let stub = Stub::default();
        stub.with(|a| a.expired_tickets.push("ticket@@@1".into()));
        let f = fixture(&stub.serve().await);
        let e = f.platform.component_token().await.unwrap_err();
        assert_eq!(e.code(), Some(61005));
        assert!(
            e.to_string()
                .starts_with("61005 refused 61005 rid: 1-2-3: no valid component_verify_ticket"),
            "{e}"
        );
        // Asked again with the same ticket: WeChat is not asked.
        let again = f.platform.component_token().await.unwrap_err();
        assert_eq!(again.code(), Some(61005));
        assert_eq!(
            stub.calls_to("/cgi-bin/component/api_component_token")
                .len(),
            1
        );
        // A new ticket arrives: it is used.
        f.platform.store_ticket("ticket@@@2").unwrap();
        assert_eq!(
            f.tickets.ticket("open").unwrap().as_deref(),
            Some("ticket@@@2")
        );
        assert_eq!(f.platform.component_token().await.unwrap(), "ctok0");
        assert_eq!(
            stub.calls_to("/cgi-bin/component/api_component_token")
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn refused_configuration_is_a_config_error_with_the_code_first_and_no_secret() {
        let stub = Stub::default();
        let f = fixture(&stub.serve().await);
        for (code, says) in [
            (40125, "component_secret"),
            (41004, "component_secret"),
            (61004, "whitelist"),
            (61011, "component_app_id"),
        ] {
            stub.with(|a| a.token_code = Some(code));
            let e = f.platform.component_token().await.unwrap_err();
            assert!(e.is_config(), "{code}: {e:?}");
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("{code} refused {code}")),
                "{text}"
            );
            assert!(text.contains(says), "{text}");
            assert!(
                !text.contains(COMPONENT_SECRET) && !text.contains("ticket@@@"),
                "{text}"
            );
        }
        stub.with(|a| a.token_code = Some(-1));
        let e = f.platform.component_token().await.unwrap_err();
        assert!(!e.is_config());
        assert!(e.to_string().contains("try again later"), "{e}");
    }

    #[tokio::test]
    async fn component_apis_carry_the_token_and_a_refused_token_is_replaced_once() {
        let stub = Stub::default();
        let f = fixture(&stub.serve().await);
        let (code, life) = f.platform.pre_auth_code().await.unwrap();
        assert_eq!(
            (code.as_str(), life),
            ("preauthcode@@@p1", Duration::from_secs(1800))
        );
        let calls = stub.calls_to("/cgi-bin/component/api_create_preauthcode");
        assert_eq!(calls[0].0, "component_access_token=ctok0");
        assert_eq!(calls[0].1, json!({"component_appid": "wx5f4e3d2c1b0a9f8e"}));
        stub.with(|a| a.expire_component_token = true);
        f.platform.pre_auth_code().await.unwrap();
        let calls = stub.calls_to("/cgi-bin/component/api_create_preauthcode");
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[2].0, "component_access_token=ctok1");
        assert_eq!(f.shared.tokens.fetches(), 2);
    }

    #[tokio::test]
    async fn query_auth_reads_the_granted_permissions_and_hides_the_tokens() {
        let stub = Stub::default();
        stub.with(|a| a.granted = vec![24, 1, 2, 1, 33]);
        let f = fixture(&stub.serve().await);
        let auth = f.platform.query_auth("queryauthcode@@@good").await.unwrap();
        assert_eq!(auth.app_id, "wx8a7c3e1f5b2d4690");
        assert_eq!(auth.refresh_token, "refreshtoken@@@r1");
        assert_eq!(auth.access_token, "atok-from-query");
        assert_eq!(auth.expires_in, Duration::from_secs(7200));
        assert_eq!(auth.granted, [1, 2, 24, 33]);
        let shown = format!("{auth:?}");
        assert!(
            !shown.contains("refreshtoken@@@") && !shown.contains("atok"),
            "{shown}"
        );
        let e = f
            .platform
            .query_auth("queryauthcode@@@old")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(61010));
        assert!(e.to_string().contains("start the binding again"), "{e}");
        assert!(!e.to_string().contains("queryauthcode"), "{e}");
        let info = f
            .platform
            .authorizer_info("wx8a7c3e1f5b2d4690")
            .await
            .unwrap();
        assert_eq!(
            info,
            AuthorizerInfo {
                app_id: "wx8a7c3e1f5b2d4690".into(),
                nick_name: Some("品牌公众号".into()),
                granted: vec![1, 2, 24, 33],
            }
        );
    }

    #[tokio::test]
    async fn an_authorizer_token_comes_from_the_refresh_token_and_61023_is_revoked() {
        let stub = Stub::default();
        let f = fixture(&stub.serve().await);
        let got = f
            .platform
            .authorizer_token("wx8a7c3e1f5b2d4690", &Secret::new("refreshtoken@@@r1"))
            .await
            .unwrap();
        assert_eq!(got.access_token.expose(), "atok0");
        assert_eq!(got.refresh_token.unwrap().expose(), "refreshtoken@@@r1");
        stub.with(|a| a.revoked = true);
        let e = f
            .platform
            .authorizer_token("wx8a7c3e1f5b2d4690", &Secret::new("refreshtoken@@@r1"))
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::Revoked { .. }), "{e:?}");
        assert!(e.to_string().contains("touchctl auth wechat"), "{e}");
        assert!(!e.to_string().contains("refreshtoken@@@"), "{e}");
    }

    #[test]
    fn the_authorisation_urls_name_the_account_and_encode_the_redirect() {
        let f = fixture("http://127.0.0.1:9");
        let redirect = "https://hooks.example.com/wechat/platforms/open/authorized?state=b 1&x=y";
        let pc = f
            .platform
            .pc_url("preauthcode@@@p1", redirect, "wx8a7c3e1f5b2d4690");
        let mobile = f
            .platform
            .mobile_url("preauthcode@@@p1", redirect, "wx8a7c3e1f5b2d4690");
        let parsed = url::Url::parse(&pc).unwrap();
        assert_eq!(parsed.path(), "/cgi-bin/componentloginpage");
        assert!(
            pc.starts_with(
                "http://127.0.0.1:9/cgi-bin/componentloginpage?component_appid=wx5f4e3d2c1b0a9f8e&"
            ),
            "{pc}"
        );
        let pairs: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
        assert_eq!(pairs["redirect_uri"], redirect);
        assert_eq!(pairs["pre_auth_code"], "preauthcode@@@p1");
        assert_eq!(pairs["auth_type"], "1");
        assert_eq!(pairs["biz_appid"], "wx8a7c3e1f5b2d4690");
        assert_eq!(pairs["category_id_list"], CATEGORY_ID_LIST);
        assert!(!pc.contains("state=b 1") && !pc.contains("&x=y"), "{pc}");
        assert!(mobile.starts_with("http://127.0.0.1:9/wxaopen/safe/bindcomponent?action=bindcomponent&no_scan=1&component_appid="), "{mobile}");
        assert!(mobile.ends_with("#wechat_redirect"), "{mobile}");
        let parsed = url::Url::parse(&mobile).unwrap();
        let pairs: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
        assert_eq!(pairs["redirect_uri"], redirect);
        assert_eq!(pairs["biz_appid"], "wx8a7c3e1f5b2d4690");
        // Without `api_base`, the real hosts.
        let mut spec = super::super::stub::spec("http://x");
        spec.api_base = None;
        let real = Platform::open(
            "open",
            &spec,
            f.dir.path(),
            &f.policy,
            f.tickets.clone(),
            &f.shared,
        )
        .unwrap();
        assert!(
            real.pc_url("p", "https://a", "wx1")
                .starts_with("https://mp.weixin.qq.com/cgi-bin/componentloginpage?")
        );
        assert!(
            real.mobile_url("p", "https://a", "wx1")
                .starts_with("https://open.weixin.qq.com/wxaopen/safe/bindcomponent?")
        );
        assert_eq!(real.api_base(), "https://api.weixin.qq.com");
    }

    #[test]
    fn a_platform_whose_aes_key_is_wrong_or_secret_unreadable_is_unavailable() {
        let f = fixture("http://127.0.0.1:9");
        std::fs::write(f.dir.path().join("secrets/aes"), "short").unwrap();
        let e = Platform::open(
            "open",
            &super::super::stub::spec("http://x"),
            f.dir.path(),
            &f.policy,
            f.tickets.clone(),
            &f.shared,
        )
        .unwrap_err();
        assert!(e.0.contains("EncodingAESKey is not valid"), "{e}");
        std::fs::remove_file(f.dir.path().join("secrets/component")).unwrap();
        let e = Platform::open(
            "open",
            &super::super::stub::spec("http://x"),
            f.dir.path(),
            &f.policy,
            f.tickets.clone(),
            &f.shared,
        )
        .unwrap_err();
        assert!(e.0.starts_with("cannot read `component_secret`"), "{e}");
    }

    #[test]
    fn platforms_are_set_replaced_found_and_retained_by_id() {
        let f = fixture("http://127.0.0.1:9");
        let platforms = Platforms::default();
        platforms.set(f.platform.clone());
        assert!(Arc::ptr_eq(&platforms.get("open").unwrap(), &f.platform));
        assert!(platforms.get("other").is_none());
        platforms.retain(["other"]);
        assert!(platforms.get("open").is_none());
        platforms.set(f.platform.clone());
        platforms.retain(vec!["open".to_string()]);
        assert!(platforms.get("open").is_some());
    }

    #[test]
    fn a_refresh_token_is_written_whole_owner_only_and_only_where_secrets_may_be_read() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture("http://127.0.0.1:9");
        let file = SecretRef::File {
            file: "secrets/oa/refresh".into(),
        };
        let base = f.dir.path().join("touchpoints");
        std::fs::create_dir_all(&base).unwrap();
        let file = match file {
            SecretRef::File { file } => SecretRef::File {
                file: format!("../{file}"),
            },
            other => other,
        };
        let path = write_refresh_token(&file, &base, &f.policy, "refreshtoken@@@r1").unwrap();
        assert_eq!(path, base.join("../secrets/oa/refresh"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "refreshtoken@@@r1\n"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Read back as a secret, and replaced whole.
        assert_eq!(
            file.resolve(&base, &f.policy).unwrap().expose(),
            "refreshtoken@@@r1"
        );
        write_refresh_token(&file, &base, &f.policy, "refreshtoken@@@r2").unwrap();
        assert_eq!(
            file.resolve(&base, &f.policy).unwrap().expose(),
            "refreshtoken@@@r2"
        );
        let leftovers: Vec<_> = std::fs::read_dir(f.dir.path().join("secrets/oa"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        // Outside the repository and the secrets folder: refused, nothing written.
        let outside = tempfile::tempdir().unwrap();
        let far = SecretRef::File {
            file: outside.path().join("refresh").display().to_string(),
        };
        let e = write_refresh_token(&far, &base, &f.policy, "t").unwrap_err();
        assert!(
            matches!(e, PlatformError::Place(SecretError::FileOutside { .. })),
            "{e:?}"
        );
        assert!(!outside.path().join("refresh").exists());
        let env = SecretRef::Env { env: "X".into() };
        assert!(matches!(
            write_refresh_token(&env, &base, &f.policy, "t"),
            Err(PlatformError::NotAFile(_))
        ));
        assert!(matches!(
            write_refresh_token(&file, &base, &f.policy, "two\nlines"),
            Err(PlatformError::BadToken)
        ));
    }
}
