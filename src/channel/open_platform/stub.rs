//! A stand-in for api.weixin.qq.com's component APIs and the few OA APIs a third-party account
//! uses, on 127.0.0.1, for unit tests: it answers as CHANNELS.md §2 says, records every call and
//! can be told to refuse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, RawQuery, State};
use axum::routing::post;
use serde_json::{Value, json};

use super::client::{Platform, TicketStore};
use crate::channel::Shared;
use crate::model::{SecretPolicy, WechatOpenPlatformSpec};

pub const COMPONENT_APP_ID: &str = "wx5f4e3d2c1b0a9f8e";
pub const COMPONENT_SECRET: &str = "c0mp0nent-s3cret";
pub const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

/// What the stub was asked and how it answers.
pub struct Answers {
    /// Every call: path, query, body.
    pub calls: Vec<(String, String, Value)>,
    /// Component tokens issued (the current one is `ctok{n-1}`).
    pub component_tokens: u32,
    /// Tickets answered with 61005.
    pub expired_tickets: Vec<String>,
    /// `api_component_token` answers this code.
    pub token_code: Option<i64>,
    /// The next component API call answers 42001.
    pub expire_component_token: bool,
    /// The permission sets granted.
    pub granted: Vec<u32>,
    /// `api_authorizer_token` answers 61023.
    pub revoked: bool,
    /// The refresh token `api_authorizer_token` returns (else the one sent).
    pub rotate_to: Option<String>,
    /// Authorizer tokens issued (the current one is `atok{n-1}`), by refresh token.
    pub authorizer_tokens: u32,
    /// The refresh tokens `api_authorizer_token` was sent.
    pub refreshed_with: Vec<String>,
    /// The mini programs `wxamplinkget` lists: app id and status.
    pub linked: Vec<(String, i64)>,
    /// Template sends: the access token and the body.
    pub sends: Vec<(String, Value)>,
}

impl Default for Answers {
    fn default() -> Self {
        Self {
            calls: Vec::new(),
            component_tokens: 0,
            expired_tickets: Vec::new(),
            token_code: None,
            expire_component_token: false,
            granted: vec![1, 2, 3, 4, 7, 11, 15, 24],
            revoked: false,
            rotate_to: None,
            authorizer_tokens: 0,
            refreshed_with: Vec::new(),
            linked: Vec::new(),
            sends: Vec::new(),
        }
    }
}

#[derive(Clone, Default)]
pub struct Stub(pub Arc<Mutex<Answers>>);

impl Stub {
    pub fn with<R>(&self, f: impl FnOnce(&mut Answers) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }

    /// The calls to `path` made so far.
    pub fn calls_to(&self, path: &str) -> Vec<(String, Value)> {
        self.with(|a| {
            a.calls
                .iter()
                .filter(|(p, _, _)| p == path)
                .map(|(_, q, b)| (q.clone(), b.clone()))
                .collect()
        })
    }

    /// Serves the stub; its base URL.
    pub async fn serve(&self) -> String {
        let app = axum::Router::new()
            .route("/cgi-bin/component/{api}", post(component))
            .route("/cgi-bin/message/template/send", post(send))
            .route("/cgi-bin/wxopen/wxamplinkget", post(linked))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }
}

fn query_value(q: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn refuse(code: i64) -> axum::Json<Value> {
    axum::Json(json!({"errcode": code, "errmsg": format!("refused {code} rid: 1-2-3")}))
}

async fn component(
    State(stub): State<Stub>,
    Path(api): Path<String>,
    RawQuery(q): RawQuery,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let q = q.unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut a = stub.0.lock().unwrap();
    a.calls
        .push((format!("/cgi-bin/component/{api}"), q.clone(), body.clone()));
    if body["component_appid"] != COMPONENT_APP_ID {
        return refuse(61011);
    }
    if api == "api_component_token" {
        if let Some(code) = a.token_code {
            return refuse(code);
        }
        if body["component_appsecret"] != COMPONENT_SECRET {
            return refuse(40125);
        }
        let ticket = body["component_verify_ticket"].as_str().unwrap_or_default();
        if ticket.is_empty() || a.expired_tickets.iter().any(|t| t == ticket) {
            return refuse(61005);
        }
        a.component_tokens += 1;
        return axum::Json(json!({
            "component_access_token": format!("ctok{}", a.component_tokens - 1),
            "expires_in": 7200
        }));
    }
    let current = format!("ctok{}", a.component_tokens.saturating_sub(1));
    if a.expire_component_token {
        a.expire_component_token = false;
        return refuse(42001);
    }
    if query_value(&q, "component_access_token").as_deref() != Some(current.as_str()) {
        return refuse(40001);
    }
    let func_info: Vec<Value> = a
        .granted
        .iter()
        .map(|id| json!({"funcscope_category": {"id": id}}))
        .collect();
    match api.as_str() {
        "api_create_preauthcode" => {
            axum::Json(json!({"pre_auth_code": "preauthcode@@@p1", "expires_in": 1800}))
        }
        "api_query_auth" => {
            if body["authorization_code"] != "queryauthcode@@@good" {
                return refuse(61010);
            }
            axum::Json(json!({"authorization_info": {
                "authorizer_appid": "wx8a7c3e1f5b2d4690",
                "authorizer_access_token": "atok-from-query",
                "expires_in": 7200,
                "authorizer_refresh_token": "refreshtoken@@@r1",
                "func_info": func_info,
            }}))
        }
        "api_get_authorizer_info" => axum::Json(json!({
            "authorizer_info": {"nick_name": "品牌公众号", "service_type_info": {"id": 2}},
            "authorization_info": {
                "authorizer_appid": body["authorizer_appid"],
                "func_info": func_info,
            }
        })),
        "api_authorizer_token" => {
            let sent = body["authorizer_refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            a.refreshed_with.push(sent.clone());
            if a.revoked {
                return refuse(61023);
            }
            a.authorizer_tokens += 1;
            let refresh = a.rotate_to.clone().unwrap_or(sent);
            axum::Json(json!({
                "authorizer_access_token": format!("atok{}", a.authorizer_tokens - 1),
                "expires_in": 7200,
                "authorizer_refresh_token": refresh,
            }))
        }
        _ => refuse(-1),
    }
}

async fn send(
    State(stub): State<Stub>,
    RawQuery(q): RawQuery,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let q = q.unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut a = stub.0.lock().unwrap();
    let token = query_value(&q, "access_token").unwrap_or_default();
    a.sends.push((token.clone(), body));
    let current = format!("atok{}", a.authorizer_tokens.saturating_sub(1));
    if token != current {
        return refuse(42001);
    }
    axum::Json(json!({"errcode": 0, "errmsg": "ok", "msgid": 1}))
}

async fn linked(State(stub): State<Stub>, RawQuery(q): RawQuery) -> axum::Json<Value> {
    let a = stub.0.lock().unwrap();
    let token = query_value(&q.unwrap_or_default(), "access_token").unwrap_or_default();
    if token != format!("atok{}", a.authorizer_tokens.saturating_sub(1)) {
        return refuse(40001);
    }
    let items: Vec<Value> = a
        .linked
        .iter()
        .map(|(appid, status)| json!({"appid": appid, "status": status, "username": "gh_1"}))
        .collect();
    axum::Json(json!({"errcode": 0, "errmsg": "ok", "wxopens": {"items": items}}))
}

/// Tickets in memory.
#[derive(Default)]
pub struct MemTickets(pub Mutex<HashMap<String, String>>);

impl TicketStore for MemTickets {
    fn ticket(&self, platform_id: &str) -> Result<Option<String>, String> {
        Ok(self.0.lock().unwrap().get(platform_id).cloned())
    }

    fn store(&self, platform_id: &str, ticket: &str) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .insert(platform_id.into(), ticket.into());
        Ok(())
    }
}

/// The spec of platform `open` at `api_base`, its secrets in the files `open_platform_fixture`
/// writes.
pub fn spec(api_base: &str) -> WechatOpenPlatformSpec {
    toml::from_str(&format!(
        r#"
component_app_id = "{COMPONENT_APP_ID}"
component_secret = {{ file = "secrets/component" }}
token = {{ file = "secrets/token" }}
encoding_aes_key = {{ file = "secrets/aes" }}
api_base = "{api_base}"
allow_insecure = true
"#
    ))
    .unwrap()
}

/// A folder with the platform's secrets, the policy that reads them, and the platform `open`
/// at `api_base` (ticket `ticket@@@1` stored), live in `shared`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub policy: SecretPolicy,
    pub tickets: Arc<MemTickets>,
    pub shared: Arc<Shared>,
    pub platform: Arc<Platform>,
}

pub fn fixture(api_base: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    for (name, value) in [
        ("component", COMPONENT_SECRET),
        ("token", "msg-token"),
        ("aes", AES_KEY),
    ] {
        std::fs::write(dir.path().join("secrets").join(name), value).unwrap();
    }
    let policy = SecretPolicy::new(Some(dir.path()));
    let tickets = Arc::new(MemTickets::default());
    tickets.store("open", "ticket@@@1").unwrap();
    let shared = Arc::new(Shared::default());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let platform = Platform::open(
        "open",
        &spec(api_base),
        dir.path(),
        &policy,
        tickets.clone(),
        &shared,
    )
    .unwrap()
    .with_network(reqwest::Client::new(), true);
    let platform = Arc::new(platform);
    shared.platforms.set(platform.clone());
    Fixture {
        dir,
        policy,
        tickets,
        shared,
        platform,
    }
}
